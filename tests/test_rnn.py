"""RNN decoders with Bahdanau and Luong attention, against a float64 NumPy loop."""

import keras
import numpy as np
import pytest

import reference_blocks as ref
from keras_checks import assert_all_close, assert_finite, fit_step, roundtrip, to_numpy
from keras_decoder.audit import audit_causal_leakage, audit_padding_leakage
from keras_decoder.rnn import BahdanauAttention, LuongAttention, RNNDecoder

B, T, S, E, U, V = 2, 5, 4, 6, 8, 13
TOL = dict(rtol=1e-5, atol=1e-5)

VARIANTS = [("bahdanau", "gru", "general"), ("bahdanau", "lstm", "general"),
            ("luong", "gru", "dot"), ("luong", "gru", "general"), ("luong", "lstm", "concat")]


def _data(rng, memory_dim=U):
    ids = rng.integers(1, V, (B, T)).astype("int32")
    memory = rng.standard_normal((B, S, memory_dim)).astype("float32")
    mask = np.array([[True] * S, [True] * (S - 2) + [False] * 2])
    return ids, memory, mask


def _decoder(attention, cell, score, memory_dim=U):
    decoder = RNNDecoder(V, E, U, attention=attention, cell=cell, score=score)
    decoder.build((B, T), (B, S, memory_dim))
    return decoder


@pytest.mark.parametrize("attention,cell,score", VARIANTS)
def test_decoder_matches_numpy_loop(rng, attention, cell, score):
    ids, memory, mask = _data(rng)
    decoder = _decoder(attention, cell, score)
    logits, weights = decoder(ids, memory, memory_mask=mask, return_attention_scores=True)
    expected_logits, expected_weights = ref.rnn_decoder(
        ids, memory, mask, ref.rnn_decoder_weights(decoder), attention, cell, score)
    np.testing.assert_allclose(to_numpy(logits), expected_logits, **TOL)
    np.testing.assert_allclose(to_numpy(weights), expected_weights, **TOL)
    assert np.all(to_numpy(weights)[1, :, S - 2:] == 0.0)  # padded source: weight exactly 0


@pytest.mark.parametrize("attention,cell,score", VARIANTS[:1] + VARIANTS[-1:])
def test_step_matches_teacher_forced_call(rng, attention, cell, score):
    ids, memory, mask = _data(rng)
    decoder = _decoder(attention, cell, score)
    full = to_numpy(decoder(ids, memory, memory_mask=mask))
    state = decoder.get_initial_state(memory)
    for t in range(T):
        logits, state = decoder.step(ids[:, t], state, memory, memory_mask=mask)
        np.testing.assert_allclose(to_numpy(logits), full[:, t], **TOL)


def test_scan_path_matches_unrolled_loop(rng):
    ids, memory, mask = _data(rng)
    decoder = _decoder("luong", "lstm", "general")
    unrolled = decoder(ids, memory, memory_mask=mask, return_attention_scores=True)
    decoder.UNROLL_MAX_LENGTH = 0  # force keras.ops.scan
    scanned = decoder(ids, memory, memory_mask=mask, return_attention_scores=True)
    assert_all_close(scanned, unrolled, rtol=1e-6, atol=1e-6)


def test_padded_memory_is_ignored(rng):
    ids, memory, mask = _data(rng)
    decoder = _decoder("bahdanau", "gru", "general")
    before = to_numpy(decoder(ids, memory, memory_mask=mask))
    changed = memory.copy()
    changed[~mask] = rng.standard_normal(changed[~mask].shape) * 100
    after = to_numpy(decoder(ids, changed, memory_mask=mask))
    np.testing.assert_array_equal(before, after)


def test_fully_masked_memory_gives_zero_context(rng):
    ids, memory, _ = _data(rng)
    attention = BahdanauAttention(4)
    query = rng.standard_normal((B, U)).astype("float32")
    mask = np.zeros((B, S), bool)
    context, weights = attention(query, memory, mask=mask, return_attention_scores=True)
    assert np.all(to_numpy(context) == 0) and np.all(to_numpy(weights) == 0)


@pytest.mark.parametrize("layer,score", [(BahdanauAttention, None), (LuongAttention, "dot"),
                                         (LuongAttention, "general"),
                                         (LuongAttention, "concat")])
def test_attention_layers_match_numpy(rng, layer, score):
    query = rng.standard_normal((B, 3, U)).astype("float32")  # several queries at once
    memory = rng.standard_normal((B, S, U)).astype("float32")
    mask = np.array([[1, 1, 1, 1], [1, 0, 1, 0]], bool)
    attention = BahdanauAttention(5) if layer is BahdanauAttention else LuongAttention(score)
    context, weights = attention(query, memory, mask=mask, return_attention_scores=True)
    w = ref.rnn_attention_weights(attention)
    for q in range(3):
        if layer is BahdanauAttention:
            scores = ref.bahdanau_scores(query[:, q].astype(np.float64), memory, w)
        else:
            scores = ref.luong_scores(query[:, q].astype(np.float64), memory, w, score)
        expected = ref.masked_softmax(scores, mask)
        np.testing.assert_allclose(to_numpy(weights)[:, q], expected, **TOL)
        np.testing.assert_allclose(to_numpy(context)[:, q],
                                   np.einsum("bs,bsm->bm", expected, memory), **TOL)


def test_bad_arguments():
    with pytest.raises(ValueError, match="attention"):
        RNNDecoder(V, E, U, attention="transformer")
    with pytest.raises(ValueError, match="cell"):
        RNNDecoder(V, E, U, cell="rnn")
    with pytest.raises(ValueError, match="score"):
        LuongAttention("cosine")
    with pytest.raises(ValueError, match="same feature size"):
        LuongAttention("dot").build((B, U), (B, S, U + 1))
    decoder = RNNDecoder(V, E, U, cell="lstm")
    with pytest.raises(ValueError, match="2 initial state"):
        decoder(np.ones((B, T), "int32"), np.ones((B, S, U), "float32"),
                initial_state=[np.zeros((B, U), "float32")])


# ---------------------------------------------------------------------------
# The checks every public layer gets.
# ---------------------------------------------------------------------------
def _rnn_seq2seq(attentions=(("bahdanau", "gru"), ("luong", "lstm")), memory_dim=U):
    """Embedding (mask_zero) → Dense encoder → RNN decoder(s): a small RNN seq2seq.

    The encoder's Keras padding mask travels with ``memory`` into each decoder
    (``memory_mask`` is filled in by Keras). A per-token Dense stands in for a
    recurrent encoder to keep the tests fast. With several decoders, their
    logits are summed: one model, one compile.
    """
    src = keras.Input((None,), dtype="int32", name="encoder_input_ids")
    tgt = keras.Input((None,), dtype="int32", name="decoder_input_ids")
    x = keras.layers.Embedding(V, E, mask_zero=True)(src)
    memory = keras.layers.Dense(memory_dim, activation="tanh")(x)
    logits = [RNNDecoder(V, E, U, attention=a, cell=c, score="general")(tgt, memory)
              for a, c in attentions]
    logits = logits[0] if len(logits) == 1 else keras.layers.Add()(logits)
    return keras.Model({"encoder_input_ids": src, "decoder_input_ids": tgt}, logits)


def _seq2seq_batch(rng):
    src = rng.integers(1, V, (B, S)).astype("int32")
    src[0, -1] = 0
    ids = rng.integers(1, V, (B, T)).astype("int32")
    return {"encoder_input_ids": src, "decoder_input_ids": ids}


def test_symbolic_roundtrip_fit(rng, tmp_path):
    model = _rnn_seq2seq()
    inputs = _seq2seq_batch(rng)
    assert tuple(model(inputs).shape) == (B, T, V)
    roundtrip(model, inputs, tmp_path)
    # The loop over time is unrolled when compiled: a short batch keeps it small.
    short = {"encoder_input_ids": inputs["encoder_input_ids"][:, :3],
             "decoder_input_ids": inputs["decoder_input_ids"][:, :2]}
    fit_step(model, short, rng.integers(1, V, (B, 2)).astype("int32"))


def test_audits_pass_on_rnn_seq2seq(rng):
    model = _rnn_seq2seq()
    inputs = _seq2seq_batch(rng)
    inputs["encoder_input_ids"][1, 2:] = 0
    inputs["decoder_input_ids"][1, 3:] = 0
    assert audit_causal_leakage(model, inputs, positions=[0, 2]).passed
    assert audit_padding_leakage(model, inputs).passed


def test_mixed_precision(rng):
    keras.config.set_dtype_policy("mixed_bfloat16")
    ids, memory, mask = _data(rng)
    decoder = RNNDecoder(V, E, U, attention="luong", cell="lstm")
    logits = decoder(ids, memory, memory_mask=mask)
    assert keras.backend.standardize_dtype(logits.dtype) == "bfloat16"
    assert_finite(logits)
    keras.config.set_dtype_policy("float32")


def test_get_config_round_trip():
    decoder = RNNDecoder(V, E, U, attention="luong", cell="lstm", score="concat",
                         attention_units=3, name="dec")
    clone = RNNDecoder.from_config(decoder.get_config())
    assert clone.get_config() == decoder.get_config()
    attention = BahdanauAttention(7)
    assert BahdanauAttention.from_config(attention.get_config()).units == 7
    assert_all_close(1.0, 1.0)
