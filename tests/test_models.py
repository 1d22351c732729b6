"""DecoderOnlyLM and Seq2SeqTransformer: NumPy reference, KV cache, Keras checks."""

import keras
import numpy as np
import pytest

import reference_blocks as ref
from keras_checks import (BACKEND, assert_finite, check_loads_under_other_backend, fit_step,
                          roundtrip, set_weights_from_seed, to_numpy)
from keras_decoder import DecoderOnlyLM, Seq2SeqTransformer

B, T, S, V, C, H, F, L = 2, 6, 5, 17, 8, 2, 16, 12
TOL = dict(rtol=1e-5, atol=1e-5)


def _lm(position="learned", num_kv_heads=None, tie=True, num_layers=2, **kwargs):
    return DecoderOnlyLM(V, L, C, H, F, num_layers=num_layers, num_kv_heads=num_kv_heads,
                         position=position, tie_embeddings=tie, **kwargs)


def _s2s(interaction="sequential", num_decoder_layers=2, **kwargs):
    return Seq2SeqTransformer(V + 2, V, L, C, H, F, num_encoder_layers=1,
                              num_decoder_layers=num_decoder_layers, interaction=interaction,
                              **kwargs)


def _ids(rng, length=T, vocab=V, left_pad_row=None, right_pad_row=1):
    ids = rng.integers(1, vocab, (B, length)).astype("int32")
    if right_pad_row is not None:
        ids[right_pad_row, -2:] = 0
    if left_pad_row is not None:
        ids[left_pad_row, :2] = 0
    return ids


def _s2s_batch(rng):
    src = _ids(rng, S, V + 2, right_pad_row=0)
    return {"encoder_input_ids": src, "decoder_input_ids": _ids(rng)}


# ---------------------------------------------------------------------------
# Against a float64 NumPy forward pass.
# ---------------------------------------------------------------------------
def _lm_reference(model, ids):
    ids = np.asarray(ids)
    table = ref._np(model.embedding.token_embedding.embeddings)
    x = table[ids]
    rotary = model.position == "rotary"
    if not rotary:
        x = x + ref._np(model.embedding.position_embedding.embeddings)[np.arange(ids.shape[1])]
    mask = ref.self_attention_mask(ids != 0)
    positions = (np.arange(ids.shape[1]),) * 2 if rotary else None
    for block in model.blocks:
        x = ref.decoder_block(x, None, ref.block_weights(block), self_mask=mask, num_heads=H,
                              num_kv_heads=model.num_kv_heads, rotary_positions=positions)
    x = ref.layer_norm(x, *ref.norm_weights(model.final_norm), 1e-5)
    if model.tie_embeddings:
        return x @ table.T
    return x @ ref._np(model.lm_head.kernel) + ref._np(model.lm_head.bias)


@pytest.mark.parametrize("position,num_kv_heads,tie", [("learned", None, True),
                                                       ("rotary", 1, False)])
def test_decoder_only_lm_matches_numpy(rng, position, num_kv_heads, tie):
    model = _lm(position, num_kv_heads, tie)
    ids = _ids(rng, left_pad_row=0)
    logits = model(ids)
    set_weights_from_seed(model, seed=int(rng.integers(1 << 30)))
    logits = model(ids)
    assert tuple(logits.shape) == (B, T, V)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    np.testing.assert_allclose(to_numpy(logits), _lm_reference(model, ids), **TOL)


def test_seq2seq_matches_numpy(rng):
    model = _s2s()
    batch = _s2s_batch(rng)
    model(batch)
    set_weights_from_seed(model, seed=int(rng.integers(1 << 30)))
    src, tgt = batch["encoder_input_ids"], batch["decoder_input_ids"]

    def embed(layer, ids):
        return (ref._np(layer.token_embedding.embeddings)[ids]
                + ref._np(layer.position_embedding.embeddings)[np.arange(ids.shape[1])])

    memory = embed(model.encoder_embedding, src)
    for block in model.encoder_blocks:
        memory = ref.encoder_block(memory, ref.block_weights(block), mask=(src != 0)[:, None],
                                   num_heads=H)
    memory = ref.layer_norm(memory, *ref.norm_weights(model.encoder_norm), 1e-5)
    x = embed(model.decoder_embedding, tgt)
    for block in model.decoder_blocks:
        x = ref.decoder_block(x, memory, ref.block_weights(block),
                              self_mask=ref.self_attention_mask(tgt != 0),
                              cross_mask=(src != 0)[:, None], num_heads=H)
    x = ref.layer_norm(x, *ref.norm_weights(model.decoder_norm), 1e-5)
    expected = x @ ref._np(model.decoder_embedding.token_embedding.embeddings).T
    np.testing.assert_allclose(to_numpy(model(batch)), expected, **TOL)


# ---------------------------------------------------------------------------
# KV cache: a full pass equals a prompt pass plus token-by-token cached steps.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("position,num_kv_heads", [("learned", None), ("rotary", 1),
                                                   ("sinusoidal", None)])
def test_lm_cached_pass_matches_full_pass(rng, position, num_kv_heads):
    model = _lm(position, num_kv_heads)
    ids = _ids(rng, left_pad_row=0, right_pad_row=1)
    full = to_numpy(model(ids))
    cache = model.init_cache(B, L)
    prompt = 3
    logits, cache = model.call_with_cache(ids[:, :prompt], cache, 0)
    np.testing.assert_allclose(to_numpy(logits), full[:, :prompt], **TOL)
    for t in range(prompt, T):
        logits, cache = model.call_with_cache(ids[:, t:t + 1], cache, t)
        np.testing.assert_allclose(to_numpy(logits)[:, 0], full[:, t], **TOL)
    np.testing.assert_array_equal(to_numpy(cache["padding"])[:, :T], ids != 0)


@pytest.mark.parametrize("interaction", ["sequential", "parallel", "joint"])
def test_seq2seq_cached_pass_matches_full_pass(rng, interaction):
    model = _s2s(interaction, num_kv_heads=1)
    batch = _s2s_batch(rng)
    full = to_numpy(model(batch))
    cache = model.init_cache(B, L, encoder_input_ids=batch["encoder_input_ids"])
    memory_k = to_numpy(cache["cross_attention"][0][0])
    ids = batch["decoder_input_ids"]
    for t in range(T):
        logits, cache = model.call_with_cache(ids[:, t:t + 1], cache, t)
        np.testing.assert_allclose(to_numpy(logits)[:, 0], full[:, t], **TOL)
    np.testing.assert_array_equal(to_numpy(cache["cross_attention"][0][0]), memory_k)


def test_cached_step_traces_once(rng):
    """One compiled step serves every cache_index (a tensor, not a Python int)."""
    model = _lm("rotary", 1)
    ids = _ids(rng, right_pad_row=None)
    full = to_numpy(model(ids))
    traces = []

    def step(token, cache, index):
        traces.append(1)
        return model.call_with_cache(token, cache, index)

    if BACKEND == "jax":
        import jax

        step_fn = jax.jit(step)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        step_fn = tf.function(step, jit_compile=True)
    else:  # torch: eager, still with a tensor index
        step_fn = step
    cache = model.init_cache(B, L)
    for t in range(T):
        index = keras.ops.convert_to_tensor(t, dtype="int32")
        logits, cache = step_fn(keras.ops.convert_to_tensor(ids[:, t:t + 1]), cache, index)
        np.testing.assert_allclose(to_numpy(logits)[:, 0], full[:, t], **TOL)
    if BACKEND in ("jax", "tensorflow"):
        assert len(traces) == 1


@pytest.mark.parametrize("kind", ["learned", "rotary", "sinusoidal", "joint", "sequential"])
def test_predict_on_batch_with_new_lengths(rng, kind):
    """Each new length makes Keras retrace ``predict_on_batch`` (on TensorFlow with
    relaxed, unknown lengths); every output equals the eager call."""
    model = _s2s(kind) if kind in ("joint", "sequential") else _lm(kind)
    for length in (4, 7):
        if kind in ("joint", "sequential"):
            batch = {"encoder_input_ids": _ids(rng, length - 1, V + 2, right_pad_row=0),
                     "decoder_input_ids": _ids(rng, length)}
        else:
            batch = _ids(rng, length)
        got = np.asarray(model.predict_on_batch(batch))
        np.testing.assert_allclose(got, to_numpy(model(batch)), **TOL)


def test_start_index_shifts_learned_positions(rng):
    """A left-padded row with start_index = -pads gives the unpadded row's logits."""
    model = _lm("learned")
    rows = rng.integers(1, V, (B, T - 2)).astype("int32")
    alone = to_numpy(model(rows))
    padded = np.concatenate([np.zeros((B, 2), "int32"), rows], axis=1)
    shifted = to_numpy(model(padded, start_index=np.full((B,), -2, "int32")))
    np.testing.assert_allclose(shifted[:, 2:], alone, **TOL)


# ---------------------------------------------------------------------------
# The checks every public model gets.
# ---------------------------------------------------------------------------
def _models_and_batches(rng):
    return [(_lm("learned"), _ids(rng)), (_lm("rotary", 1, tie=False), _ids(rng)),
            (_s2s("joint"), _s2s_batch(rng))]


def test_symbolic_call(rng):
    ids = keras.Input((T,), dtype="int32")
    functional = keras.Model(ids, _lm("rotary", 1)(ids))
    assert tuple(functional.output.shape) == (None, T, V)
    assert tuple(functional(_ids(rng)).shape) == (B, T, V)
    src = keras.Input((S,), dtype="int32")
    tgt = keras.Input((T,), dtype="int32")
    out = _s2s()({"encoder_input_ids": src, "decoder_input_ids": tgt})
    assert tuple(out.shape) == (None, T, V)


def test_roundtrip_fit_and_other_backend(rng, tmp_path):
    pairs = _models_and_batches(rng)[1:]  # the learned-position LM is the same code path
    for i, (model, batch) in enumerate(pairs):
        model(batch)
        set_weights_from_seed(model, seed=i)
        roundtrip(model, batch, tmp_path, name=f"model{i}.keras")
    check_loads_under_other_backend(pairs, tmp_path)
    # One-block models for the compiled step (XLA compile time grows with depth).
    for model, batch in ((_lm("rotary", 1, tie=False, num_layers=1), pairs[0][1]),
                         (_s2s(num_decoder_layers=1), pairs[1][1])):
        ids = batch if not isinstance(batch, dict) else batch["decoder_input_ids"]
        fit_step(model, batch, ids, sample_weight=(ids != 0).astype("float32"))


def test_mixed_precision(rng):
    keras.config.set_dtype_policy("mixed_bfloat16")
    pairs = _models_and_batches(rng)[1:]  # LM (rotary, GQA, untied) and Seq2Seq (joint)
    for model, batch in pairs:
        logits = model(batch)
        assert keras.backend.standardize_dtype(logits.dtype) == "float32"
        assert_finite(logits)
    model, batch = pairs[0]  # and its cached path
    cache = model.init_cache(B, L)
    logits, cache = model.call_with_cache(batch[:, :2], cache, 0)
    assert_finite(logits)
    assert keras.backend.standardize_dtype(cache["self_attention"][0][0].dtype) == "bfloat16"
    keras.config.set_dtype_policy("float32")


def test_logits_carry_no_keras_mask(rng):
    from keras.src.backend.common.masking import get_keras_mask

    model = _lm(tie=False)
    assert get_keras_mask(model(_ids(rng))) is None


def test_lora_on_query_and_value(rng):
    model = _lm()
    ids = _ids(rng)
    before = to_numpy(model(ids))
    targets = [layer for layer in model._flatten_layers() if layer.name in ("query", "value")]
    assert len(targets) == 2 * 2
    for layer in targets:
        layer.enable_lora(2)
    np.testing.assert_allclose(to_numpy(model(ids)), before, **TOL)  # LoRA B starts at 0


def test_weight_paths_are_stable():
    model = _lm("learned", tie=True)
    model.build((B, T))
    paths = {w.path for w in model.weights}
    name = model.name
    for expected in ("embedding/token_embedding/embeddings",
                     "embedding/position_embedding/embeddings",
                     "decoder_block_1/self_attention/query/kernel",
                     "decoder_block_0/feed_forward/hidden/kernel", "final_norm/gamma"):
        assert f"{name}/{expected}" in paths, sorted(paths)
    assert not any("lm_head" in p for p in paths)  # tied


def test_config_and_errors():
    for model in (_lm("rotary", 1, tie=False, dropout=0.1), _s2s("parallel", norm_first=False)):
        clone = type(model).from_config(model.get_config())
        assert clone.get_config() == model.get_config()
    with pytest.raises(ValueError, match="position"):
        _lm("alibi")
    with pytest.raises(ValueError, match="position"):
        _s2s(position="rotary")
    model = _s2s()
    with pytest.raises(ValueError, match="encoder_input_ids"):
        model({"decoder_input_ids": np.ones((B, T), "int32")})
    with pytest.raises(ValueError, match="encoder_input_ids"):
        model.init_cache(B, L)
