"""FeedForward and the Transformer blocks: NumPy references, KerasHub, Keras checks."""

import keras
import keras_hub
import numpy as np
import pytest

import reference_blocks as ref
from keras_checks import assert_finite, roundtrip, to_numpy
from keras_decoder.layers import FeedForward, TransformerDecoderBlock, TransformerEncoderBlock

B, T, S, C, H, F = 2, 5, 4, 8, 2, 16
TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(rng):
    x = rng.standard_normal((B, T, C)).astype("float32")
    memory = rng.standard_normal((B, S, C)).astype("float32")
    pad = np.array([[True] * T, [True] * (T - 2) + [False] * 2])  # right-padded decoder row
    memory_pad = np.array([[True] * S, [True] * (S - 1) + [False]])
    return x, memory, pad, memory_pad


def _perturb(layer, rng):
    """Non-trivial norms and biases (the initial ones are 1 and 0)."""
    for w in layer.weights:
        if w.path.endswith(("gamma", "beta", "bias")):
            w.assign(rng.standard_normal(tuple(w.shape)).astype("float32") * 0.5
                     + (1.0 if w.path.endswith("gamma") else 0.0))


def _self_mask(pad, causal=True):
    return ref.self_attention_mask(pad, causal) if causal else pad[:, None, :]


# ---------------------------------------------------------------------------
# Against float64 NumPy.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_feed_forward_matches_numpy(rng, activation):
    x = rng.standard_normal((B, T, C)).astype("float32")
    layer = FeedForward(C, F, activation=activation)
    layer.build(x.shape)
    _perturb(layer, rng)
    expected = ref.feed_forward(x.astype(np.float64), ref.ff_weights(layer), activation)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, **TOL)


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_block_matches_numpy(rng, norm_first):
    x, _, pad, _ = _inputs(rng)
    block = TransformerEncoderBlock(C, H, F, norm_first=norm_first)
    block.build(x.shape)
    _perturb(block, rng)
    out = block(x, padding_mask=pad)
    expected = ref.encoder_block(x.astype(np.float64), ref.block_weights(block),
                                 mask=pad[:, None, :], norm_first=norm_first, num_heads=H)
    np.testing.assert_allclose(to_numpy(out), expected, **TOL)


DECODER_CASES = [
    dict(interaction="sequential", norm_first=True),
    dict(interaction="sequential", norm_first=False, activation="relu"),
    dict(interaction="parallel", norm_first=True),
    dict(interaction="joint", norm_first=True),
    dict(interaction="sequential", norm_first=True, num_kv_heads=1),
    dict(cross_attention=False, norm_first=True, rotary=True),
]


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", DECODER_CASES, ids=_case_id)
def test_decoder_block_matches_numpy(rng, case):
    x, memory, pad, memory_pad = _inputs(rng)
    case = dict(case)
    cross = case.pop("cross_attention", True)
    block = TransformerDecoderBlock(C, H, F, cross_attention=cross, **case)
    block.build(x.shape, memory.shape if cross else None)
    _perturb(block, rng)
    if cross:
        out = block(x, memory, padding_mask=pad, memory_mask=memory_pad)
    else:
        out = block(x, padding_mask=pad)
    w = ref.block_weights(block)
    positions = (np.arange(T), np.arange(T)) if case.get("rotary") else None
    expected = ref.decoder_block(
        x.astype(np.float64), memory.astype(np.float64) if cross else None, w,
        self_mask=_self_mask(pad), cross_mask=memory_pad[:, None, :],
        norm_first=case["norm_first"], activation=case.get("activation", "gelu"),
        num_heads=H, num_kv_heads=case.get("num_kv_heads"),
        interaction=case.get("interaction", "sequential"), rotary_positions=positions)
    np.testing.assert_allclose(to_numpy(out), expected, **TOL)


# ---------------------------------------------------------------------------
# Against KerasHub, weights copied.
# ---------------------------------------------------------------------------
def _copy_mha(ours, theirs):
    for mine, other in ((ours.query_dense, theirs._query_dense), (ours.key_dense, theirs._key_dense),
                        (ours.value_dense, theirs._value_dense),
                        (ours.output_dense, theirs._output_dense)):
        mine.kernel.assign(other.kernel)
        mine.bias.assign(other.bias)


def _copy_norm(ours, theirs):
    ours.gamma.assign(theirs.gamma)
    ours.beta.assign(theirs.beta)


def _copy_ff(ours, theirs):
    ours.feed_forward.hidden.kernel.assign(theirs._feedforward_intermediate_dense.kernel)
    ours.feed_forward.hidden.bias.assign(theirs._feedforward_intermediate_dense.bias)
    ours.feed_forward.output_dense.kernel.assign(theirs._feedforward_output_dense.kernel)
    ours.feed_forward.output_dense.bias.assign(theirs._feedforward_output_dense.bias)
    _copy_norm(ours.feed_forward_norm, theirs._feedforward_layer_norm)


def test_decoder_block_matches_keras_hub(rng):
    """Post-norm, ReLU, epsilon 1e-5: KerasHub's TransformerDecoder defaults."""
    x, memory, pad, memory_pad = _inputs(rng)
    theirs = keras_hub.layers.TransformerDecoder(intermediate_dim=F, num_heads=H)
    expected = theirs(x, memory, decoder_padding_mask=pad, encoder_padding_mask=memory_pad)
    _perturb(theirs, rng)
    expected = theirs(x, memory, decoder_padding_mask=pad, encoder_padding_mask=memory_pad)
    ours = TransformerDecoderBlock(C, H, F, norm_first=False, activation="relu",
                                   layer_norm_epsilon=theirs.layer_norm_epsilon)
    ours.build(x.shape, memory.shape)
    _copy_mha(ours.self_attention, theirs._self_attention_layer)
    _copy_norm(ours.self_attention_norm, theirs._self_attention_layer_norm)
    _copy_mha(ours.cross_attention, theirs._cross_attention_layer)
    _copy_norm(ours.cross_attention_norm, theirs._cross_attention_layer_norm)
    _copy_ff(ours, theirs)
    out = ours(x, memory, padding_mask=pad, memory_mask=memory_pad)
    np.testing.assert_allclose(to_numpy(out), to_numpy(expected), **TOL)


def test_encoder_block_matches_keras_hub(rng):
    x, _, pad, _ = _inputs(rng)
    theirs = keras_hub.layers.TransformerEncoder(intermediate_dim=F, num_heads=H)
    theirs(x, padding_mask=pad)
    _perturb(theirs, rng)
    expected = theirs(x, padding_mask=pad)
    ours = TransformerEncoderBlock(C, H, F, norm_first=False, activation="relu",
                                   layer_norm_epsilon=theirs.layer_norm_epsilon)
    ours.build(x.shape)
    _copy_mha(ours.self_attention, theirs._self_attention_layer)
    _copy_norm(ours.self_attention_norm, theirs._self_attention_layer_norm)
    _copy_ff(ours, theirs)
    np.testing.assert_allclose(to_numpy(ours(x, padding_mask=pad)), to_numpy(expected), **TOL)


# ---------------------------------------------------------------------------
# Caches, masks, errors.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("interaction", ["sequential", "joint"])
def test_decoder_block_cached_steps_match_full_pass(rng, interaction):
    x, memory, pad, memory_pad = _inputs(rng)
    block = TransformerDecoderBlock(C, H, F, interaction=interaction, num_kv_heads=1)
    full = to_numpy(block(x, memory, padding_mask=pad, memory_mask=memory_pad))
    cache = block.init_cache(B, T + 2)
    memory_cache = block.memory_cache(memory)
    cache_pad = np.concatenate([pad, np.zeros((B, 2), bool)], axis=1)  # (B, L)
    for t in range(T):
        out, cache = block(x[:, t:t + 1], padding_mask=cache_pad, memory_mask=memory_pad,
                           self_attention_cache=cache, cross_attention_cache=memory_cache,
                           cache_index=t)
        np.testing.assert_allclose(to_numpy(out)[:, 0], full[:, t], **TOL)


def test_keras_masks_are_read(rng):
    """Without explicit masks, the blocks read the inputs' Keras masks."""
    ids = rng.integers(1, 9, (B, T)).astype("int32")
    ids[1, -2:] = 0
    x = keras.layers.Embedding(9, C, mask_zero=True)(ids)
    memory = keras.layers.Embedding(9, C, mask_zero=True)(ids[:, :S])
    block = TransformerDecoderBlock(C, H, F)
    implicit = to_numpy(block(x, memory))
    explicit = to_numpy(block(x, memory, padding_mask=ids != 0, memory_mask=ids[:, :S] != 0))
    np.testing.assert_allclose(implicit, explicit, rtol=1e-6, atol=1e-6)
    encoder = TransformerEncoderBlock(C, H, F)
    np.testing.assert_allclose(to_numpy(encoder(x)), to_numpy(encoder(x, padding_mask=ids != 0)),
                               rtol=1e-6, atol=1e-6)


def test_use_causal_mask_false_sees_the_future(rng):
    x, _, _, _ = _inputs(rng)
    block = TransformerDecoderBlock(C, H, F, cross_attention=False)
    changed = x.copy()
    changed[:, -1] = rng.standard_normal((B, C))
    causal = to_numpy(block(changed))[:, :-1] - to_numpy(block(x))[:, :-1]
    leaky = (to_numpy(block(changed, use_causal_mask=False))[:, :-1]
             - to_numpy(block(x, use_causal_mask=False))[:, :-1])
    assert np.abs(causal).max() < 1e-6 and np.abs(leaky).max() > 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TransformerDecoderBlock(10, 3, F)
    with pytest.raises(ValueError, match="interaction"):
        TransformerDecoderBlock(C, H, F, interaction="sum")
    with pytest.raises(ValueError, match="rotary=False"):
        TransformerDecoderBlock(C, H, F, interaction="joint", rotary=True)
    block = TransformerDecoderBlock(C, H, F)
    with pytest.raises(ValueError, match="memory"):
        block(np.zeros((B, T, C), "float32"))
    gpt = TransformerDecoderBlock(C, H, F, cross_attention=False)
    with pytest.raises(ValueError, match="cross_attention=False"):
        gpt(np.zeros((B, T, C), "float32"), np.zeros((B, S, C), "float32"))
    with pytest.raises(ValueError, match="cache_index"):
        gpt(np.zeros((B, 1, C), "float32"), self_attention_cache=gpt.init_cache(B, T))
    with pytest.raises(ValueError, match="batch, seq_len, 8"):
        FeedForward(C, F).build((B, T, C + 1))


# ---------------------------------------------------------------------------
# The checks every public layer gets: symbolic call, .keras round trip,
# a jit-compiled fit step, mixed precision.
# ---------------------------------------------------------------------------
def _all_layers_model():
    """Every public layer in one small token model (one build, one compile).

    source ids → Embedding → TransformerEncoderBlock → memory; target ids →
    Embedding → decoder blocks (sequential+GQA, parallel, joint, GPT-style
    rotary) → FeedForward → logits.
    """
    src = keras.Input((S,), dtype="int32", name="encoder_input_ids")
    tgt = keras.Input((T,), dtype="int32", name="decoder_input_ids")
    memory = keras.layers.Embedding(11, C, mask_zero=True)(src)
    memory = TransformerEncoderBlock(C, H, F, dropout=0.1)(memory)
    x = keras.layers.Embedding(11, C, mask_zero=True)(tgt)
    x = TransformerDecoderBlock(C, H, F, dropout=0.1, num_kv_heads=1)(x, memory)
    x = TransformerDecoderBlock(C, H, F, interaction="parallel", norm_first=False)(x, memory)
    x = TransformerDecoderBlock(C, H, F, interaction="joint")(x, memory)
    x = TransformerDecoderBlock(C, H, F, cross_attention=False, rotary=True)(x)
    x = FeedForward(C, F, dropout=0.1)(x)
    logits = keras.layers.Dense(11)(x)
    return keras.Model({"encoder_input_ids": src, "decoder_input_ids": tgt}, logits)


def _small_model():
    """One of each layer class, for the compiled fit step and mixed precision."""
    src = keras.Input((S,), dtype="int32", name="encoder_input_ids")
    tgt = keras.Input((T,), dtype="int32", name="decoder_input_ids")
    memory = keras.layers.Embedding(11, C, mask_zero=True)(src)
    memory = TransformerEncoderBlock(C, H, F, dropout=0.1)(memory)
    x = keras.layers.Embedding(11, C, mask_zero=True)(tgt)
    x = TransformerDecoderBlock(C, H, F, num_kv_heads=1)(x, memory)
    x = FeedForward(C, F)(x)
    logits = keras.layers.Dense(11)(x)
    return keras.Model({"encoder_input_ids": src, "decoder_input_ids": tgt}, logits)


def _batch(rng):
    ids = rng.integers(1, 11, (B, T)).astype("int32")
    ids[1, -1] = 0
    src = rng.integers(0, 11, (B, S)).astype("int32")
    src[:, 0] = 1
    return {"decoder_input_ids": ids, "encoder_input_ids": src}


def test_symbolic_roundtrip(rng, tmp_path):
    model = _all_layers_model()
    batch = _batch(rng)
    assert tuple(model(batch).shape) == (B, T, 11)
    roundtrip(model, batch, tmp_path)


# The compiled fit step of FeedForward, TransformerEncoderBlock and
# TransformerDecoderBlock is in tests/test_models.py: a Seq2SeqTransformer holds
# all three, and a DecoderOnlyLM the rotary/GQA decoder block. (XLA compile time
# is the slowest part of this suite, so each graph is compiled once.)


def test_mixed_precision(rng):
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = _small_model()
    out = model(_batch(rng))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert_finite(out)
    keras.config.set_dtype_policy("float32")


def test_get_config_round_trip():
    block = TransformerDecoderBlock(C, H, F, dropout=0.1, norm_first=False, interaction="parallel",
                                    num_kv_heads=1, activation="relu", layer_norm_epsilon=1e-6)
    assert TransformerDecoderBlock.from_config(block.get_config()).get_config() == block.get_config()
    block = TransformerEncoderBlock(C, H, F, norm_first=False)
    assert TransformerEncoderBlock.from_config(block.get_config()).get_config() == block.get_config()


def test_weight_paths_are_stable():
    block = TransformerDecoderBlock(C, H, F, name="decoder_block_0")
    block.build((B, T, C), (B, S, C))
    paths = {w.path for w in block.weights}
    for expected in ("decoder_block_0/self_attention/query/kernel",
                     "decoder_block_0/cross_attention/value/kernel",
                     "decoder_block_0/feed_forward/hidden/kernel",
                     "decoder_block_0/feed_forward/output/bias",
                     "decoder_block_0/cross_attention_norm/gamma"):
        assert expected in paths, sorted(paths)
