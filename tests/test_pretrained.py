"""keras_decoder.pretrained("tiny-lm"): the shipped checkpoint loads and agrees on every backend.

``scripts/pretrain_tiny_lm.py`` stored a fixed input and its logits (computed
on the backend it trained on) next to the checkpoint. Each backend runs this
file in its own process, so matching those logits within 1e-4 on each one is
the cross-backend check.
"""

import numpy as np
import pytest
from keras import ops

import keras_decoder
from keras_decoder import hub
from keras_decoder.models import DecoderOnlyLM

REFERENCE_TEXTS = ("<en> one hundred and twelve", "<fr> 345 = trois cent quarante-cinq")


@pytest.fixture(scope="module")
def tiny():
    return keras_decoder.pretrained("tiny-lm")


def test_files_are_shipped_and_small():
    files = sorted(hub.CHECKPOINTS.glob("tiny_lm*"))
    names = {f.name for f in files}
    assert {"tiny_lm.keras", "tiny_lm_vocab.txt", "tiny_lm_reference_ids.npy",
            "tiny_lm_reference_logits.npy"} <= names
    assert sum(f.stat().st_size for f in files) <= 10 * 2**20


def test_returns_model_and_tokenizer(tiny):
    model, tokenizer = tiny  # a named tuple
    assert tiny.model is model and tiny.tokenizer is tokenizer
    assert isinstance(model, DecoderOnlyLM)
    assert model.count_params() <= 3_000_000
    assert model.vocab_size == tokenizer.vocab_size
    assert model.pad_id == tokenizer.pad_id == 0


def test_logits_match_the_stored_reference(tiny):
    ids = np.load(hub.CHECKPOINTS / "tiny_lm_reference_ids.npy")
    expected = np.load(hub.CHECKPOINTS / "tiny_lm_reference_logits.npy")
    # The stored ids are the shipped tokenizer's: the vocabulary and the model belong together.
    rows = tiny.tokenizer.tokenize(list(REFERENCE_TEXTS), add_start_end=True).to_list()
    for row, stored in zip(rows, ids):
        np.testing.assert_array_equal(stored[: len(row)], row)
        assert (stored[len(row):] == tiny.tokenizer.pad_id).all()
    logits = ops.convert_to_numpy(tiny.model(ids))
    assert logits.shape == expected.shape == ids.shape + (tiny.tokenizer.vocab_size,)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    # A different input gives clearly different logits: the comparison can fail.
    shifted = np.where(ids > 3, (ids + 1) % tiny.tokenizer.vocab_size, ids)
    assert np.abs(ops.convert_to_numpy(tiny.model(shifted)) - expected).max() > 1e-2


def test_the_model_knows_its_corpus(tiny):
    """Pretrained, not random: it reads digits in words, and words in digits."""
    model, tokenizer = tiny
    for text, next_word in (("<en> 345 =", "three"), ("<fr> 345 =", "trois"),
                            ("<en> forty-two =", "42")):
        ids = tokenizer.tokenize([text], add_start_end=True).to_list()[0][:-1]  # no [END]
        logits = ops.convert_to_numpy(model(np.array([ids], "int32")))
        token = tokenizer.id_to_token(int(logits[0, -1].argmax()))
        assert next_word.startswith(token), (text, token)


def test_each_call_loads_a_fresh_copy(tiny):
    other = keras_decoder.pretrained("tiny-lm").model
    assert other is not tiny.model
    variable = other.weights[0]
    variable.assign(np.zeros(variable.shape, "float32"))
    assert np.abs(np.asarray(tiny.model.weights[0])).max() > 0


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="tiny-lm"):
        keras_decoder.pretrained("gpt-5")
