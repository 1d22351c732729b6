"""keras_decoder.inputs: shift-right, teacher forcing, embeddings, RoPE, prefixes."""

import keras
import numpy as np
import pytest
from keras import ops

import reference as ref
from backend_info import BACKEND, JIT_BACKENDS
from keras_decoder import inputs as I
from keras_decoder import masks as M


def np_(x):
    return ops.convert_to_numpy(x)


def padded_ids(rng, batch, length, vocab):
    ids = rng.integers(1, vocab, size=(batch, length))
    lengths = rng.integers(1, length + 1, size=batch)
    ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return ids.astype("int32")


# ---------------------------------------------------------------- shift-right, teacher forcing
def test_shift_right_matches_reference(rng):
    ids = padded_ids(rng, 4, 7, 30)
    ids[1] = 0  # a row that is all padding stays all padding
    np.testing.assert_array_equal(np_(I.shift_right(ids, start_id=2)), ref.shift_right(ids, 2))
    np.testing.assert_array_equal(np_(I.shift_right([[5, 6, 7]], start_id=1)), [[1, 5, 6]])


def test_teacher_forcing_splits_inputs_and_labels():
    seq = np.array([[2, 10, 11, 12, 3, 0, 0], [2, 20, 3, 0, 0, 0, 0]], "int32")
    out = I.teacher_forcing(seq)
    np.testing.assert_array_equal(np_(out["decoder_input_ids"]), seq[:, :-1])
    np.testing.assert_array_equal(np_(out["labels"]), seq[:, 1:])
    np.testing.assert_array_equal(np_(out["sample_weight"]), (seq[:, 1:] != 0).astype("float32"))
    assert keras.backend.standardize_dtype(out["sample_weight"].dtype) == "float32"


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: I.shift_right(np.ones((3,), "int32"), 1), r"rank 2.*\(3,\)"),
        (lambda: I.shift_right(np.ones((2, 3), "float32"), 1), r"integer.*float32"),
        (lambda: I.teacher_forcing(np.ones((2, 1), "int32")), r"length >= 2.*\(2, 1\)"),
    ],
)
def test_bad_decoder_inputs_raise(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# ---------------------------------------------------------------- positions
def test_sinusoidal_encoding_matches_closed_form(rng):
    dim, length, start = 10, 9, 3
    layer = I.SinusoidalPositionEncoding()
    x = np.zeros((2, length, dim), "float32")
    got = np_(layer(x, start_index=start))
    expected = ref.sinusoidal(np.arange(start, start + length), dim)
    np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], expected, rtol=1e-5, atol=1e-5)
    # Odd dimension: still the same formula, truncated.
    odd = np_(I.SinusoidalPositionEncoding()(np.zeros((1, 4, 7), "float32")))
    np.testing.assert_allclose(odd[0], ref.sinusoidal(np.arange(4), 7), rtol=1e-5, atol=1e-5)


def test_rotary_matches_reference_and_accepts_per_row_start(rng):
    x = rng.normal(size=(2, 5, 3, 8)).astype("float32")
    layer = I.RotaryEmbedding()
    np.testing.assert_allclose(np_(layer(x, start_index=4)), ref.rotary(x, np.arange(4, 9)),
                               rtol=1e-5, atol=1e-5)
    starts = np.array([0, 7], "int32")
    positions = starts[:, None] + np.arange(5)[None]
    np.testing.assert_allclose(np_(layer(x, start_index=starts)), ref.rotary(x, positions),
                               rtol=1e-5, atol=1e-5)


def test_rotary_dot_product_depends_only_on_distance(rng):
    """<rot(q, p), rot(k, s)> is a function of p - s: shift both and nothing changes."""
    dim = 16
    q = rng.normal(size=(1, 1, 1, dim)).astype("float32")
    k = rng.normal(size=(1, 1, 1, dim)).astype("float32")
    rope = I.RotaryEmbedding()

    def score(p, s):
        return float(np.sum(np_(rope(q, start_index=p)) * np_(rope(k, start_index=s))))

    for distance in (0, 1, 5):
        scores = [score(base + distance, base) for base in (0, 3, 17, 100)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    # ... and it does change with the distance (the property is not vacuous).
    assert abs(score(5, 0) - score(1, 0)) > 1e-3


def test_rotary_rejects_odd_head_dim():
    with pytest.raises(ValueError, match=r"even head_dim.*\(1, 2, 1, 5\)"):
        I.RotaryEmbedding()(np.zeros((1, 2, 1, 5), "float32"))


# ---------------------------------------------------------------- TokenAndPositionEmbedding
@pytest.mark.parametrize("position", ["learned", "sinusoidal", "none"])
def test_token_and_position_embedding_matches_numpy(rng, position):
    vocab, length, dim = 13, 8, 6
    layer = I.TokenAndPositionEmbedding(vocab, length, dim, position=position, scale=True)
    ids = padded_ids(rng, 3, 5, vocab)
    out = layer(ids, start_index=2)
    table = np_(layer.embeddings).astype("float64")
    expected = table[ids] * np.sqrt(dim)
    if position == "learned":
        expected = expected + np_(layer.position_embedding.embeddings)[2:7][None]
    elif position == "sinusoidal":
        expected = expected + ref.sinusoidal(np.arange(2, 7), dim)[None]
    np.testing.assert_allclose(np_(out), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np_(out._keras_mask), ids != 0)


def test_start_index_offsets_positions_like_a_slice_of_the_full_sequence(rng):
    layer = I.TokenAndPositionEmbedding(20, 10, 4)
    ids = rng.integers(1, 20, size=(2, 7)).astype("int32")
    full = np_(layer(ids))
    for start in (0, 3, 6):
        step = np_(layer(ids[:, start:start + 1], start_index=start))
        np.testing.assert_allclose(step[:, 0], full[:, start], rtol=1e-6, atol=1e-6)


def test_per_row_start_index_for_left_padded_prompts(rng):
    """Row 1 is left-padded by 2: its first real token gets position 0."""
    layer = I.TokenAndPositionEmbedding(20, 10, 4)
    ids = np.array([[5, 6, 7, 8], [0, 0, 5, 6]], "int32")
    out = np_(layer(ids, start_index=np.array([0, -2], "int32")))
    np.testing.assert_allclose(out[1, 2:], out[0, :2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "ids, start, pattern",
    [
        (np.array([[1, 13]], "int32"), 0, r"vocab_size=13.*from 1 to 13"),
        (np.array([[-1, 2]], "int32"), 0, r"vocab_size=13.*from -1 to 2"),
        (np.array([[1.0, 2.0]], "float32"), 0, r"integer.*float32"),
        (np.array([[1, 2, 3]], "int32"), 6, r"max_length=8.*start_index=6, seq_len=3"),
    ],
)
def test_token_and_position_embedding_rejects_bad_ids(ids, start, pattern):
    layer = I.TokenAndPositionEmbedding(13, 8, 4)
    with pytest.raises(ValueError, match=pattern):
        layer(ids, start_index=start)


def test_position_argument_is_checked():
    with pytest.raises(ValueError, match=r"position=.*'rope'"):
        I.TokenAndPositionEmbedding(10, 4, 2, position="rope")


# ---------------------------------------------------------------- PrefixConditioning
def test_prefix_conditioning_prepends_projected_context_and_extends_mask(rng):
    vocab, dim, prefix, context_dim = 11, 4, 2, 3
    embed = I.TokenAndPositionEmbedding(vocab, 8, dim)
    cond = I.PrefixConditioning(prefix, dim)
    ids = padded_ids(rng, 2, 5, vocab)
    context = rng.normal(size=(2, context_dim)).astype("float32")
    tokens = embed(ids)
    out = cond(tokens, context)
    assert tuple(out.shape) == (2, prefix + 5, dim)
    kernel, bias = (np_(w).astype("float64") for w in cond.projection.weights)
    expected_prefix = (context @ kernel + bias).reshape(2, prefix, dim)
    np.testing.assert_allclose(np_(out)[:, :prefix], expected_prefix, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np_(out)[:, prefix:], np_(tokens), rtol=1e-6)
    expected_mask = np.concatenate([np.ones((2, prefix), bool), ids != 0], axis=1)
    np.testing.assert_array_equal(np_(out._keras_mask), expected_mask)
    # The decoder's mask for it: prefix bidirectional, causal after, padding as keys.
    full = M.combine_masks(M.prefix_lm_mask(np.full((2,), prefix, "int32"), prefix + 5),
                           ops.expand_dims(out._keras_mask, 1))
    assert np_(full)[:, 0, 1].all()  # the first prefix slot sees the second one


def test_prefix_conditioning_rejects_bad_shapes():
    cond = I.PrefixConditioning(2, 4)
    with pytest.raises(ValueError, match=r"context.*\(2, 3, 1\)"):
        cond(np.zeros((2, 5, 4), "float32"), np.zeros((2, 3, 1), "float32"))
    with pytest.raises(ValueError, match=r"\(batch, seq_len, 4\).*\(2, 5, 3\)"):
        cond(np.zeros((2, 5, 3), "float32"), np.zeros((2, 3), "float32"))


# ---------------------------------------------------------------- every layer: the Keras contract
def _embedding_model(position):
    ids = keras.Input((None,), dtype="int32", name="ids")
    x = I.TokenAndPositionEmbedding(17, 12, 8, position=position, name="embed")(ids)
    return keras.Model(ids, x)


def _sinusoidal_model():
    x = keras.Input((None, 6))
    return keras.Model(x, I.SinusoidalPositionEncoding()(x))


def _rotary_model():
    x = keras.Input((None, 2, 8))
    return keras.Model(x, I.RotaryEmbedding()(x))


def _prefix_model():
    ids = keras.Input((None,), dtype="int32")
    context = keras.Input((5,))
    tokens = I.TokenAndPositionEmbedding(17, 12, 8)(ids)
    return keras.Model([ids, context], I.PrefixConditioning(3, 8)(tokens, context))


def _inputs(kind, rng):
    ids = padded_ids(rng, 3, 6, 17)
    if kind in ("learned", "sinusoidal_embedding", "none"):
        return ids
    if kind == "sinusoidal":
        return rng.normal(size=(3, 6, 6)).astype("float32")
    if kind == "rotary":
        return rng.normal(size=(3, 6, 2, 8)).astype("float32")
    return [ids, rng.normal(size=(3, 5)).astype("float32")]


BUILDERS = {
    "learned": lambda: _embedding_model("learned"),
    "sinusoidal_embedding": lambda: _embedding_model("sinusoidal"),
    "none": lambda: _embedding_model("none"),
    "sinusoidal": _sinusoidal_model,
    "rotary": _rotary_model,
    "prefix": _prefix_model,
}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_layer_symbolic_eager_and_keras_round_trip(kind, rng, tmp_path):
    model = BUILDERS[kind]()  # symbolic (functional API) call
    x = _inputs(kind, rng)
    eager = np_(model(x))  # eager call
    np.testing.assert_allclose(np_(model.predict(x, verbose=0)), eager, rtol=1e-6, atol=1e-6)
    path = tmp_path / f"{kind}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(np_(loaded(x)), eager)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_layer_under_mixed_bfloat16_has_no_nan(kind, rng):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = BUILDERS[kind]()
    out = np_(ops.cast(model(_inputs(kind, rng)), "float32"))
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "none"])
def test_output_keras_mask_equals_padding_mask(position, rng):
    ids = padded_ids(rng, 4, 6, 17)
    layer = I.TokenAndPositionEmbedding(17, 12, 8, position=position, pad_id=0)
    np.testing.assert_array_equal(np_(layer(ids)._keras_mask), np_(M.padding_mask(ids)))
    # Symbolic: the mask is attached to the functional output too.
    symbolic = layer(keras.Input((6,), dtype="int32"))
    assert symbolic._keras_mask is not None
    # A non-zero pad id.
    ids7 = np.where(ids == 0, 7, ids).astype("int32")
    layer7 = I.TokenAndPositionEmbedding(17, 12, 8, position=position, pad_id=7)
    np.testing.assert_array_equal(np_(layer7(ids7)._keras_mask), ids7 != 7)


def test_embedding_fit_step_with_jit_compile(rng):
    """One training step, compiled with XLA on TensorFlow and JAX (eager on torch)."""
    ids = keras.Input((6,), dtype="int32")
    x = I.TokenAndPositionEmbedding(17, 12, 8, position="learned")(ids)
    logits = keras.layers.Dense(17)(x)
    model = keras.Model(ids, logits)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=BACKEND in JIT_BACKENDS)
    data = padded_ids(rng, 8, 6, 17)
    before = np_(model.layers[1].embeddings).copy()
    history = model.fit(data, data, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(np_(model.layers[1].embeddings), before)
