"""The leakage audits pass on every shipped model and catch planted leaks."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_decoder import DecoderOnlyLM, Seq2SeqTransformer, TransformerDecoderBlock
from keras_decoder.audit import LeakageReport, audit_causal_leakage, audit_padding_leakage

B, T, S, V, C = 2, 6, 5, 13, 8


def _ids(rng, length=T, left=False):
    ids = rng.integers(1, V, (B, length)).astype("int32")
    if left:
        ids[0, :2] = 0  # a left-padded row
    ids[1, -2:] = 0  # a right-padded row
    return ids


# ---------------------------------------------------------------------------
# Shipped models pass.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_decoder_only_lm_passes(rng, position):
    model = DecoderOnlyLM(V, 16, C, 2, 16, num_layers=1, position=position, num_kv_heads=1)
    ids = _ids(rng, left=True)
    causal = audit_causal_leakage(model, ids)
    padding = audit_padding_leakage(model, ids)
    assert causal.passed and padding.passed, (causal, padding)
    assert isinstance(causal, LeakageReport) and causal.kind == "causal"
    assert len(causal.checks) == T - 1
    assert any(check.startswith("extend") for check in padding.checks)


def test_seq2seq_passes(rng):
    model = Seq2SeqTransformer(V, V, 16, C, 2, 16, 1, 1)
    inputs = {"encoder_input_ids": _ids(rng, S), "decoder_input_ids": _ids(rng)}
    causal = audit_causal_leakage(model, inputs)
    padding = audit_padding_leakage(model, inputs)
    assert causal.passed and padding.passed, (causal, padding)
    assert causal.where is None or causal.where["input"] == "decoder_input_ids"
    assert {c.split()[1] for c in padding.checks} >= {"encoder_input_ids", "decoder_input_ids"}


def test_cached_path_passes(rng):
    """A plain callable works too: here the KV-cached path, one token at a time."""
    model = DecoderOnlyLM(V, 16, C, 2, 16, num_layers=1, position="rotary")

    def cached(ids):
        cache, outputs = model.init_cache(ids.shape[0], 16), []
        for t in range(ids.shape[1]):
            logits, cache = model.call_with_cache(ids[:, t:t + 1], cache, t)
            outputs.append(logits)
        return ops.concatenate(outputs, axis=1)

    assert audit_causal_leakage(cached, _ids(rng), positions=[1, 3]).passed


# ---------------------------------------------------------------------------
# Planted leaks fail.
# ---------------------------------------------------------------------------
def _attention_model(use_causal_mask):
    ids = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(V, C, mask_zero=True)(ids)
    x = keras.layers.MultiHeadAttention(2, 4)(x, x, use_causal_mask=use_causal_mask)
    return keras.Model(ids, keras.layers.Dense(V)(x))


def test_missing_causal_mask_is_caught(rng):
    ids = _ids(rng)
    leaky = audit_causal_leakage(_attention_model(False), ids)
    assert not leaky.passed and leaky.max_change > 1e-3
    assert leaky.where["position"] <= leaky.where["changed_after"]
    assert "FAILED" in str(leaky)
    assert audit_causal_leakage(_attention_model(True), ids).passed


def test_decoder_block_without_causal_mask_is_caught(rng):
    ids = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(V, C, mask_zero=True)(ids)
    x = TransformerDecoderBlock(C, 2, 16, cross_attention=False)(x, use_causal_mask=False)
    model = keras.Model(ids, keras.layers.Dense(V)(x))
    assert not audit_causal_leakage(model, _ids(rng)).passed


def _pooling_model(mask_padding, pooled_output=False):
    """Each position adds the mean over the sequence: over *all* tokens, or real ones."""
    ids = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(V, C)(ids)  # no mask_zero: padding is just another token
    if mask_padding:
        real = ops.expand_dims(ops.cast(ops.not_equal(ids, 0), "float32"), -1)
        mean = ops.sum(x * real, axis=1, keepdims=True) / ops.sum(real, axis=1, keepdims=True)
    else:
        mean = ops.mean(x, axis=1, keepdims=True)  # the leak: pads count in the mean
    if pooled_output:
        return keras.Model(ids, keras.layers.Dense(3)(mean[:, 0]))
    return keras.Model(ids, keras.layers.Dense(V)(x + mean))


@pytest.mark.parametrize("pooled_output", [False, True])
def test_mean_pooling_over_padding_is_caught(rng, pooled_output):
    ids = _ids(rng)
    leaky = audit_padding_leakage(_pooling_model(False, pooled_output), ids)
    assert not leaky.passed and leaky.max_change > 1e-3, leaky
    fixed = audit_padding_leakage(_pooling_model(True, pooled_output), ids)
    assert fixed.passed, fixed


def _explicit_mask_model(use_mask):
    """KerasHub-style inputs: ``{"token_ids", "padding_mask"}``; ids under padding are arbitrary."""
    ids = keras.Input((None,), dtype="int32", name="token_ids")
    pad = keras.Input((None,), dtype="int32", name="padding_mask")
    x = keras.layers.Embedding(V, C)(ids)
    mask = ops.expand_dims(ops.cast(pad, "bool"), 1) if use_mask else None
    x = keras.layers.MultiHeadAttention(2, 4)(x, x, attention_mask=mask)
    return keras.Model({"token_ids": ids, "padding_mask": pad}, keras.layers.Dense(V)(x))


def test_explicit_padding_mask_input(rng):
    ids = _ids(rng)
    inputs = {"token_ids": ids, "padding_mask": (ids != 0).astype("int32")}
    good = audit_padding_leakage(_explicit_mask_model(True), inputs)
    assert good.passed, good
    assert any(check.startswith("random ids") for check in good.checks)
    bad = audit_padding_leakage(_explicit_mask_model(False), inputs)
    assert not bad.passed and bad.where["input"] == "token_ids"


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------
def test_errors(rng):
    model = _attention_model(True)
    with pytest.raises(ValueError, match="integer token ids"):
        audit_causal_leakage(model, np.zeros((B, T), "float32"))
    with pytest.raises(ValueError, match="positions"):
        audit_causal_leakage(model, _ids(rng), positions=[T + 3])

    def same_length_pair(inputs):  # two id inputs of the same length, no names to go by
        return keras.layers.Embedding(2 * V, C)(inputs[0] + inputs[1])

    with pytest.raises(ValueError, match="key="):
        audit_causal_leakage(same_length_pair, [_ids(rng), _ids(rng)])

    def rejects_everything(ids):
        if ids.shape[1] != T:
            raise ValueError("fixed length")
        return keras.layers.Embedding(V, C)(ids)

    ids = rng.integers(1, V, (B, T)).astype("int32")  # no padding: nothing to trim
    with pytest.raises(ValueError, match="could not run any perturbation"):
        audit_padding_leakage(rejects_everything, ids)
