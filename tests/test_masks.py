"""keras_decoder.masks against the NumPy references in tests/reference.py."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

import reference as ref
from backend_info import BACKEND, JIT_BACKENDS
from keras_decoder import masks as M


def np_(x):
    return ops.convert_to_numpy(x)


def random_padded_ids(rng, batch, length, vocab=20, min_len=1):
    """Right-padded ids: each row has between ``min_len`` and ``length`` real tokens."""
    ids = rng.integers(1, vocab, size=(batch, length))
    lengths = rng.integers(min_len, length + 1, size=batch)
    ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return ids.astype("int32")


# ---------------------------------------------------------------- hand-written cases
def test_causal_mask_3_5_is_bottom_right_aligned():
    expected = np.array(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        dtype=bool,
    )
    got = np_(M.causal_mask(3, 5))
    assert got.dtype == bool
    np.testing.assert_array_equal(got, expected)


def test_causal_mask_square_is_lower_triangle():
    np.testing.assert_array_equal(np_(M.causal_mask(4)), np.tril(np.ones((4, 4), bool)))


def test_keras_is_causal_with_query_len_ne_key_len_differs_from_bottom_right_causal_mask(rng):
    """``dot_product_attention(is_causal=True)`` is top-left aligned; a KV cache needs bottom-right."""
    b, tq, tk, h, d = 1, 3, 5, 1, 4
    q = rng.normal(size=(b, tq, h, d)).astype("float32")
    k = rng.normal(size=(b, tk, h, d)).astype("float32")
    v = rng.normal(size=(b, tk, h, d)).astype("float32")
    keras_causal = np_(ops.dot_product_attention(q, k, v, is_causal=True))
    bottom_right = ref.attention(q, k, v, M.causal_mask(tq, tk))
    top_left = ref.attention(q, k, v, ref.top_left_causal_mask(tq, tk))
    np.testing.assert_allclose(keras_causal, top_left, rtol=1e-5, atol=1e-5)
    assert not np.allclose(keras_causal, bottom_right, atol=1e-3)
    # ... while our mask passed explicitly gives the bottom-right result.
    ours = np_(ops.dot_product_attention(q, k, v, mask=M.causal_mask(tq, tk)[None, None]))
    np.testing.assert_allclose(ours, bottom_right, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- property tests
lengths = st.integers(min_value=1, max_value=8)


@given(tq=lengths, extra=st.integers(0, 6))
def test_causal_mask_matches_reference(tq, extra):
    np.testing.assert_array_equal(np_(M.causal_mask(tq, tq + extra)), ref.causal_mask(tq, tq + extra))


@given(tq=lengths, extra=st.integers(0, 6), window=st.integers(1, 12))
def test_sliding_window_mask_matches_reference(tq, extra, window):
    got = np_(M.sliding_window_mask(tq, tq + extra, window=window))
    np.testing.assert_array_equal(got, ref.sliding_window_mask(tq, tq + extra, window))


@given(seed=st.integers(0, 2**31), batch=st.integers(1, 4), length=lengths,
       pad_id=st.sampled_from([0, 3]))
def test_padding_and_self_attention_masks_match_reference(seed, batch, length, pad_id):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 6, size=(batch, length)).astype("int32")
    pad = M.padding_mask(ids, pad_id=pad_id)
    np.testing.assert_array_equal(np_(pad), ref.padding_mask(ids, pad_id))
    for causal in (True, False):
        np.testing.assert_array_equal(
            np_(M.self_attention_mask(pad, causal=causal)),
            ref.self_attention_mask(ref.padding_mask(ids, pad_id), causal),
        )


@given(seed=st.integers(0, 2**31), batch=st.integers(1, 4), tdec=lengths, tenc=lengths,
       causal=st.booleans())
def test_cross_and_joint_masks_match_reference(seed, batch, tdec, tenc, causal):
    rng = np.random.default_rng(seed)
    dec = random_padded_ids(rng, batch, tdec) != 0
    enc = random_padded_ids(rng, batch, tenc) != 0
    np.testing.assert_array_equal(np_(M.cross_attention_mask(dec, enc)), ref.cross_attention_mask(dec, enc))
    np.testing.assert_array_equal(
        np_(M.joint_attention_mask(dec, enc, causal=causal)), ref.joint_attention_mask(dec, enc, causal)
    )
    # decoder_padding_mask=None: the result broadcasts over any decoder length.
    none = np_(M.cross_attention_mask(None, enc))
    assert none.shape == (batch, 1, tenc)
    np.testing.assert_array_equal(np.broadcast_to(none, (batch, tdec, tenc)), ref.cross_attention_mask(dec, enc))


@st.composite
def packed_segments(draw):
    """A batch of packed rows: runs of segment ids 1, 2, ... then padding 0."""
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 10))
    rows = []
    for _ in range(batch):
        row, seg = [], 1
        while len(row) < length:
            run = draw(st.integers(1, length))
            row += [seg] * run
            seg += 1
        row = row[:length]
        pad = draw(st.integers(0, length))
        rows.append(row[: length - pad] + [0] * pad)
    return np.array(rows, dtype="int32")


@given(segments=packed_segments())
def test_segment_mask_matches_reference(segments):
    got = np_(M.segment_mask(segments))
    np.testing.assert_array_equal(got, ref.segment_mask(segments))
    # Padding (segment 0) attends to nothing and is attended by nothing.
    pad = segments == 0
    assert not got[pad].any()
    assert not np.transpose(got, (0, 2, 1))[pad].any()


@given(seed=st.integers(0, 2**31), batch=st.integers(1, 4), seq_len=lengths)
def test_prefix_lm_mask_matches_reference(seed, batch, seq_len):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, seq_len + 1, size=batch).astype("int32")
    np.testing.assert_array_equal(np_(M.prefix_lm_mask(prefix, seq_len)), ref.prefix_lm_mask(prefix, seq_len))


def test_segment_mask_with_separate_key_segments(rng):
    q = np.array([[1, 1, 2, 0]], "int32")
    k = np.array([[1, 2, 2, 2, 0, 1]], "int32")
    np.testing.assert_array_equal(np_(M.segment_mask(q, k)), ref.segment_mask(q, k))


# ---------------------------------------------------------------- combine and additive
def test_combine_masks_broadcasts_and_ignores_none(rng):
    ids = random_padded_ids(rng, 3, 6)
    pad = M.padding_mask(ids)
    combined = M.combine_masks(None, M.causal_mask(6), ops.expand_dims(pad, 1), None)
    np.testing.assert_array_equal(np_(combined), ref.self_attention_mask(ids != 0))
    assert M.combine_masks(None, None) is None
    assert M.combine_masks() is None


def test_combine_masks_rejects_shapes_that_do_not_broadcast():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(2, 5\)"):
        M.combine_masks(M.causal_mask(4), np.ones((2, 5), bool))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_to_additive_is_finite_and_safe(dtype):
    mask = np.array([[True, False, True], [False, False, False]])
    bias = M.to_additive(mask, dtype=dtype)
    made = ops.zeros((), dtype=dtype).dtype  # JAX without x64 makes float32 for float64
    assert keras.backend.standardize_dtype(bias.dtype) == keras.backend.standardize_dtype(made)
    values = np_(bias).astype("float64")
    assert np.all(np.isfinite(values))
    assert np.all(values[mask] == 0)
    assert np.all(values[~mask] < -1e4)
    # Adding it to scores of ordinary size, even twice, stays finite in that dtype.
    scores = ops.cast(ops.convert_to_tensor(np.full((2, 3), -100.0)), dtype)
    total = np_(scores + bias + bias).astype("float64")
    assert np.all(np.isfinite(total))
    # And a fully masked row's softmax is not NaN.
    probs = np_(ops.softmax(scores + bias, axis=-1)).astype("float64")
    assert np.all(np.isfinite(probs))


def test_minus_1e9_overflows_float16_but_to_additive_does_not():
    with np.errstate(over="ignore"):
        assert np.isinf(np.float16(-1e9))
    assert np.isfinite(np.float16(M.large_negative("float16")))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: M.padding_mask(np.ones((2, 3, 4), "int32")), r"rank 2.*\(2, 3, 4\)"),
        (lambda: M.padding_mask(np.ones((2, 3), "float32")), r"integer.*float32"),
        (lambda: M.causal_mask(5, 3), r"query_len=5, key_len=3"),
        (lambda: M.self_attention_mask(np.ones((3,), bool)), r"rank 2.*\(3,\)"),
        (lambda: M.cross_attention_mask(np.ones((2, 4), bool), np.ones((3, 5), bool)),
         r"\(2, 4\).*\(3, 5\)"),
        (lambda: M.cross_attention_mask(None, np.ones((2, 3, 5), bool)), r"rank 2.*\(2, 3, 5\)"),
        (lambda: M.segment_mask(np.ones((2, 4), "int32"), np.ones((3, 4), "int32")),
         r"\(2, 4\).*\(3, 4\)"),
        (lambda: M.segment_mask(np.ones((2, 4), "float32")), r"integer.*float32"),
        (lambda: M.sliding_window_mask(4, 4, window=0), r"window.*>= 1.*window=0"),
        (lambda: M.sliding_window_mask(4, 4), r"window=None"),
        (lambda: M.sliding_window_mask(4, 2, window=2), r"query_len=4, key_len=2"),
        (lambda: M.prefix_lm_mask(np.array([2, 7], "int32"), 5), r"seq_len=5.*\[2, 7\]"),
        (lambda: M.prefix_lm_mask(np.array([[2]], "int32"), 5), r"rank 1.*\(1, 1\)"),
        (lambda: M.prefix_lm_mask(np.array([1.5]), 5), r"integer.*float"),
        (lambda: M.joint_attention_mask(np.ones((2, 3), bool), np.ones((1, 4), bool)),
         r"\(2, 3\).*\(1, 4\)"),
        (lambda: M.causal_mask(2.5), r"int.*2.5"),
        (lambda: M.to_additive(np.ones((2, 2), bool), dtype="int32"), r"float dtype.*int32"),
    ],
)
def test_bad_input_raises_value_error_naming_what_was_received(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# ---------------------------------------------------------------- traced under jit_compile
class AllMasks(keras.Model):
    """Builds every mask from its inputs inside ``call``, so they are traced."""

    def call(self, inputs):
        ids, segments, prefix = inputs["ids"], inputs["segments"], inputs["prefix"]
        t = ids.shape[1]
        pad = M.padding_mask(ids)
        enc = M.padding_mask(ops.flip(ids, axis=1))
        masks = [
            M.self_attention_mask(pad, causal=True),
            M.cross_attention_mask(pad, enc),
            M.combine_masks(M.causal_mask(t), ops.expand_dims(pad, 1)),
            M.segment_mask(segments),
            ops.broadcast_to(M.sliding_window_mask(t, window=2), (ops.shape(ids)[0], t, t)),
            M.prefix_lm_mask(prefix, t),
            M.joint_attention_mask(pad, enc)[:, :, t:],
        ]
        stacked = ops.stack([ops.cast(m, "float32") for m in masks], axis=1)
        # Use the additive form too, so that to_additive is traced.
        return stacked + 0.0 * M.to_additive(ops.expand_dims(masks[0], 1))


def test_every_mask_builder_traces_in_a_compiled_model(rng):
    """Compiled with ``jit_compile=True`` on TensorFlow and JAX (torch has no XLA path: eager)."""
    b, t = 3, 6
    ids = random_padded_ids(rng, b, t)
    segments = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0], [1, 1, 1, 1, 1, 1]], "int32")
    prefix = rng.integers(0, t + 1, size=b).astype("int32")
    model = AllMasks()
    model.compile(jit_compile=BACKEND in JIT_BACKENDS)
    out = model.predict_on_batch({"ids": ids, "segments": segments, "prefix": prefix})
    pad, enc = ids != 0, ids[:, ::-1] != 0
    expected = [
        ref.self_attention_mask(pad),
        ref.cross_attention_mask(pad, enc),
        ref.self_attention_mask(pad),
        ref.segment_mask(segments),
        np.broadcast_to(ref.sliding_window_mask(t, t, 2), (b, t, t)),
        ref.prefix_lm_mask(prefix, t),
        ref.self_attention_mask(pad),
    ]
    np.testing.assert_array_equal(np.asarray(out).astype(bool), np.stack(expected, axis=1))


def test_mask_builders_work_in_the_functional_api_with_unknown_batch(rng):
    """Symbolic inputs: the batch size (and here the length) are unknown when tracing."""
    ids = keras.Input((None,), dtype="int32")
    enc_ids = keras.Input((None,), dtype="int32")
    pad, enc = M.padding_mask(ids), M.padding_mask(enc_ids)
    outputs = [M.self_attention_mask(pad, causal=False), M.cross_attention_mask(pad, enc),
               M.segment_mask(ids, enc_ids)]
    model = keras.Model([ids, enc_ids], [ops.cast(o, "int32") for o in outputs])
    a = random_padded_ids(rng, 3, 5)
    b = random_padded_ids(rng, 3, 4)
    got = [np.asarray(o).astype(bool) for o in model.predict([a, b], verbose=0)]
    np.testing.assert_array_equal(got[0], ref.self_attention_mask(a != 0, causal=False))
    np.testing.assert_array_equal(got[1], ref.cross_attention_mask(a != 0, b != 0))
    np.testing.assert_array_equal(got[2], ref.segment_mask(a, b))
    # With a static length, the causal and joint masks too.
    ids6 = keras.Input((6,), dtype="int32")
    enc4 = keras.Input((4,), dtype="int32")
    joint = M.joint_attention_mask(M.padding_mask(ids6), M.padding_mask(enc4))
    model = keras.Model([ids6, enc4], ops.cast(joint, "int32"))
    a, b = random_padded_ids(rng, 2, 6), random_padded_ids(rng, 2, 4)
    np.testing.assert_array_equal(np.asarray(model.predict([a, b], verbose=0)).astype(bool),
                                  ref.joint_attention_mask(a != 0, b != 0))
