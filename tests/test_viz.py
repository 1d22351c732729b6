"""keras_decoder.viz: the picture shows exactly the mask it was given."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras_decoder import masks as M  # noqa: E402
from keras_decoder.viz import plot_attention, plot_mask  # noqa: E402


def test_plot_mask_draws_the_mask_with_labels():
    mask = M.causal_mask(3, 5)
    ax = plot_mask(mask, query_labels=["a", "b", "c"], key_labels=list("vwxyz"), title="causal")
    image = ax.get_images()[0].get_array()
    np.testing.assert_array_equal(np.asarray(image).astype(bool), np.tril(np.ones((3, 5)), 2).astype(bool))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in ax.get_xticklabels()] == list("vwxyz")
    assert ax.get_title() == "causal"
    plt.close(ax.figure)


def test_plot_mask_accepts_batched_singleton_and_an_existing_axes():
    _, ax = plt.subplots()
    out = plot_mask(M.self_attention_mask(np.array([[1, 1, 0]], bool)), ax=ax)
    assert out is ax
    plt.close(ax.figure)


def test_plot_mask_rejects_wrong_rank_and_label_count():
    with pytest.raises(ValueError, match=r"\(2, 3, 3\)"):
        plot_mask(np.ones((2, 3, 3), bool))
    with pytest.raises(ValueError, match=r"Expected 3 key labels.*Received: 2"):
        plot_mask(np.ones((2, 3), bool), key_labels=["a", "b"])
    plt.close("all")


def test_plot_attention_shows_the_weights():
    w = np.random.default_rng().random((4, 6)).astype("float32")
    ax = plot_attention(w[None, None])
    np.testing.assert_allclose(np.asarray(ax.get_images()[0].get_array()), w)
    plt.close(ax.figure)
