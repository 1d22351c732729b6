"""Tests for ``keras_decoder.attention``: against float64 NumPy, against Keras
with copied weights, cache vs full pass, masks on every path, Keras idioms."""

import re

import keras
import numpy as np
import pytest
from keras import ops

import reference as ref
from keras_decoder import attention as att
from keras_decoder.attention import (
    CrossAttention,
    InteractingAttention,
    MultiHeadAttention,
    SelfAttention,
    scaled_dot_product_attention,
)

BACKEND = keras.backend.backend()
JIT = BACKEND in ("tensorflow", "jax")  # torch: jit_compile would mean torch.compile
TOL = dict(rtol=1e-5, atol=1e-5)


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def randn(rng, *shape):
    return rng.standard_normal(shape).astype("float32")


def weights_of(layer):
    """Our layer's weights in the dict layout ``reference.multi_head_attention`` reads."""
    out = {}
    for name in ("query", "key", "value", "attention_output"):
        sub = {"query": layer.query_dense, "key": layer.key_dense, "value": layer.value_dense,
               "attention_output": layer.output_dense}[name]
        kernel = np_(sub.kernel)
        bias = np_(sub.bias) if sub.bias is not None else None
        out[name] = (kernel, bias)
    return out


def randomize(layer, rng, scale=0.3):
    for w in layer.weights:
        if w.trainable:
            w.assign(rng.standard_normal(tuple(w.shape)).astype("float32") * scale)


def copy_weights(src, dst):
    """Copy the four projections by name (works both ways with Keras's layers)."""
    for name in ("query_dense", "key_dense", "value_dense", "output_dense"):
        a, b = (getattr(x, name, None) or getattr(x, "_" + name) for x in (src, dst))
        assert [tuple(w.shape) for w in a.weights] == [tuple(w.shape) for w in b.weights], name
        for wa, wb in zip(a.weights, b.weights):
            wb.assign(wa)


def random_mask(rng, shape, p=0.7, no_empty_rows=True):
    m = rng.random(shape) < p
    if no_empty_rows:
        m[..., 0] = True
    return m


def with_padding(rng, batch, length, min_len=1):
    """Bool ``(B, T)``, right padding, lengths in ``[min_len, T]``."""
    lengths = rng.integers(min_len, length + 1, size=batch)
    lengths[0] = length - 1 if length > 1 else length  # at least one row is padded
    return np.arange(length)[None] < lengths[:, None]


def compiled(fn):
    """On JAX, ``jax.jit(fn)``: one XLA compile instead of one per eager op,
    which keeps this file fast on 2 cores. Other backends run ``fn`` eagerly.
    (Eager calls on JAX are tested in the Keras-idiom tests below.)"""
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    return fn


# ---------------------------------------------------------------------------
# Backend gradients (tests only: the library itself uses keras.ops alone).
# ---------------------------------------------------------------------------
def grads(fn, *args):
    """``fn(*args)`` returns ``(scalar, aux)``: gradients of the scalar with
    respect to each array in ``args``, and ``aux`` as NumPy."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        xs = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            for x in xs:
                tape.watch(x)
            y, aux = fn(*xs)
        return [np_(g) for g in tape.gradient(y, xs)], keras.tree.map_structure(np_, aux)
    if BACKEND == "jax":
        import jax

        # One compile, not one per eager op.
        grad = jax.jit(jax.grad(fn, argnums=tuple(range(len(args))), has_aux=True))
        g, aux = grad(*args)
        return [np_(x) for x in g], keras.tree.map_structure(np_, aux)
    import torch

    xs = [torch.tensor(np.asarray(a)).requires_grad_(True) for a in args]
    y, aux = fn(*xs)
    y.backward()
    return [np_(x.grad) for x in xs], keras.tree.map_structure(lambda t: np_(t.detach()), aux)


# ---------------------------------------------------------------------------
# scaled_dot_product_attention
# ---------------------------------------------------------------------------
MASK_SHAPES = {
    "none": None,
    "2d": lambda b, h, tq, tk: (tq, tk),
    "3d": lambda b, h, tq, tk: (b, tq, tk),
    "4d": lambda b, h, tq, tk: (b, h, tq, tk),
    "keys": lambda b, h, tq, tk: (b, 1, 1, tk),
}


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("mask_kind", list(MASK_SHAPES))
@pytest.mark.parametrize("return_weights", [False, True])
def test_sdpa_matches_reference(rng, heads, kv_heads, mask_kind, return_weights):
    b, tq, tk, d = 2, 6, 5, 4
    q, k, v = randn(rng, b, tq, heads, d), randn(rng, b, tk, kv_heads, d), randn(
        rng, b, tk, kv_heads, d)
    mask = None if MASK_SHAPES[mask_kind] is None else random_mask(
        rng, MASK_SHAPES[mask_kind](b, heads, tq, tk), no_empty_rows=False)
    result = scaled_dot_product_attention(q, k, v, mask, return_weights=return_weights)
    expected, expected_w = ref.gqa_attention(q, k, v, mask)
    if return_weights:
        out, w = result
        assert tuple(w.shape) == (b, heads, tq, tk)
        np.testing.assert_allclose(np_(w), expected_w, **TOL)
    else:
        out = result
    assert tuple(out.shape) == (b, tq, heads, d)
    np.testing.assert_allclose(np_(out), expected, **TOL)


@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_bias_scale_and_value_dim(rng, with_mask):
    b, tq, tk, h, d, dv = 2, 6, 5, 4, 4, 3
    q, k, v = randn(rng, b, tq, h, d), randn(rng, b, tk, 2, d), randn(rng, b, tk, 2, dv)
    bias = randn(rng, 1, h, tq, tk)
    mask = random_mask(rng, (b, tq, tk), no_empty_rows=False) if with_mask else None
    for return_weights in (False, True):
        out = scaled_dot_product_attention(q, k, v, mask, bias=bias, scale=0.3,
                                           return_weights=return_weights)
        out = out[0] if return_weights else out
        expected, _ = ref.gqa_attention(q, k, v, mask, bias=bias, scale=0.3)
        np.testing.assert_allclose(np_(out), expected, **TOL)


def test_fused_path_equals_explicit_path(rng):
    """The two paths of one function agree (fused: no weights; explicit: weights)."""
    b, t, h, d = 2, 6, 4, 4
    q, k, v = randn(rng, b, t, h, d), randn(rng, b, t, 2, d), randn(rng, b, t, 2, d)
    mask = random_mask(rng, (b, t, t), no_empty_rows=False)
    bias = randn(rng, b, h, t, t)
    for kwargs in ({}, {"bias": bias}, {"scale": 0.1}):
        fused = scaled_dot_product_attention(q, k, v, mask, **kwargs)
        explicit, _ = scaled_dot_product_attention(q, k, v, mask, return_weights=True, **kwargs)
        np.testing.assert_allclose(np_(fused), np_(explicit), rtol=1e-6, atol=1e-6)
        # Dropout with rate 0 in training takes the fused path too.
        same = scaled_dot_product_attention(q, k, v, mask, dropout_rate=0.0, training=True,
                                            **kwargs)
        np.testing.assert_allclose(np_(same), np_(explicit), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_fully_masked_rows_are_zero_with_finite_grads(rng, dtype):
    """Every path (fused, explicit, dropout, and both blocked causal kernels):
    empty rows give exactly 0, every gradient is finite, and nothing flows
    back from an empty row."""
    b, t, h, d = 2, 6, 4, 4
    q, k, v = randn(rng, b, t, h, d), randn(rng, b, t, h, d), randn(rng, b, t, h, d)
    mask = random_mask(rng, (b, t, t))
    mask[0, 1] = False  # one empty row
    mask[1, :, :] = False  # a whole batch row with nothing to attend to
    paths = [{}, dict(return_weights=True), dict(dropout_rate=0.3, training=True, seed=3)]
    causal = np.tril(np.ones((t, t), bool))

    def run(q, k, v):
        q, k, v = (ops.cast(x, dtype) for x in (q, k, v))
        outs = [scaled_dot_product_attention(q, k, v, mask, **kw) for kw in paths]
        outs = [o[0] if isinstance(o, tuple) else o for o in outs]
        outs += [att._attend(q, k, v, mask=ops.convert_to_tensor(mask[:, None]), causal=True,
                             block_size=(4, kernel)) for kernel in ("fused", "matmul")]
        assert all(keras.backend.standardize_dtype(o.dtype) == dtype for o in outs)
        return outs

    def loss(q, k, v):
        outs = run(q, k, v)
        return sum(ops.sum(ops.cast(o, "float32") ** 2) for o in outs), outs

    (gq, gk, gv), outs = grads(loss, q, k, v)
    expected, _ = ref.gqa_attention(q, k, v, mask)
    expected_causal, _ = ref.gqa_attention(q, k, v, mask & causal)
    tol = 1e-5 if dtype == "float32" else 3e-2  # half precision: ~3 significant digits
    for i, out in enumerate(outs):
        out = np.asarray(out, "float32")
        assert np.all(out[0, 1] == 0.0) and np.all(out[1] == 0.0)
        assert np.all(np.isfinite(out))
        if i != 2:  # not the dropout path
            want = expected if i < 2 else expected_causal
            np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
    for g in (gq, gk, gv):
        assert np.all(np.isfinite(g))
    assert np.all(gq[0, 1] == 0.0) and np.all(gq[1] == 0.0)


def test_causal_mask_kept_with_dropout_and_with_weights(rng):
    """Keras once dropped the causal mask when dropout > 0 or scores were returned."""
    b, t, h, d = 2, 6, 4, 4
    q, k, v = randn(rng, b, t, h, d), randn(rng, b, t, h, d), randn(rng, b, t, h, d)
    causal = np.tril(np.ones((t, t), bool))
    k2, v2 = k.copy(), v.copy()
    k2[:, 3:] += 5.0
    v2[:, 3:] -= 5.0

    def run(q, k, v, k2, v2):
        _, w = scaled_dot_product_attention(q, k, v, causal, return_weights=True)
        kw = dict(dropout_rate=0.5, training=True, seed=7)
        return (w, scaled_dot_product_attention(q, k, v, causal, **kw),
                scaled_dot_product_attention(q, k2, v2, causal, **kw))

    w, a, c = (np_(t) for t in compiled(run)(q, k, v, k2, v2))
    # Weights returned: nothing above the diagonal.
    assert np.all(w[..., ~causal] == 0.0)
    # Dropout: changing the future keys/values leaves the outputs unchanged.
    np.testing.assert_allclose(a[:, :3], c[:, :3], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 3:], c[:, 3:])
    # Both at once, through the layer: weights have nothing above the diagonal.
    x = randn(rng, b, t, 8)
    layer = MultiHeadAttention(4, 4, dropout=0.5, seed=1)
    _, scores = layer(x, x, use_causal_mask=True, return_attention_scores=True, training=True)
    assert np.all(np_(scores)[..., ~causal] == 0.0)


def test_causal_mask_kept_by_layer_with_dropout(rng):
    b, t, c = 2, 6, 8
    x = randn(rng, b, t, c)
    x2 = x.copy()
    x2[:, 4:] += 3.0
    outs = []
    for inputs in (x, x2):
        layer = MultiHeadAttention(4, 4, dropout=0.5, seed=11)
        layer.build((b, t, c), (b, t, c))
        randomize(layer, np.random.default_rng(0))  # the same weights and dropout seed
        outs.append(np_(layer(inputs, inputs, use_causal_mask=True, training=True)))
    np.testing.assert_allclose(outs[0][:, :4], outs[1][:, :4], rtol=1e-6, atol=1e-6)


BAD_MASK_SHAPES = [(2, 7), (7,), (3, 5, 7), (2, 3, 5, 7), (5, 6), (2, 1, 1, 5, 7)]


def test_bad_mask_shapes_raise(rng):
    """Expected (B=2, H=4, Tq=5, Tk=7); each shape below cannot mean that."""
    q, k, v = randn(rng, 2, 5, 4, 4), randn(rng, 2, 7, 4, 4), randn(rng, 2, 7, 4, 4)
    layer = MultiHeadAttention(4, 4)
    for shape in BAD_MASK_SHAPES:
        message = r"Expected an attention mask.*Received: mask.shape=" + re.escape(str(shape))
        with pytest.raises(ValueError, match=message):
            scaled_dot_product_attention(q, k, v, np.ones(shape, bool))
        with pytest.raises(ValueError, match=r"\(2, 4, 5, 7\).*Received: attention_mask.shape="):
            layer(randn(rng, 2, 5, 8), randn(rng, 2, 7, 8), attention_mask=np.ones(shape, bool))
    # The good shapes pass the check.
    for shape in [(5, 7), (2, 5, 7), (2, 4, 5, 7), (1, 1, 7), (2, 1, 1, 7)]:
        scaled_dot_product_attention(q, k, v, np.ones(shape, bool))


def test_bad_heads_raise(rng):
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        scaled_dot_product_attention(randn(rng, 1, 2, 3, 4), randn(rng, 1, 2, 2, 4),
                                     randn(rng, 1, 2, 2, 4))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        MultiHeadAttention(3, 4, num_kv_heads=2)


@pytest.mark.parametrize("padded,kv_heads", [(False, 4), (True, 2)])
def test_blocked_causal_path_equals_unblocked(rng, padded, kv_heads):
    b, t, h, d = 2, 10, 4, 4
    q, k, v = randn(rng, b, t, h, d), randn(rng, b, t, kv_heads, d), randn(rng, b, t, kv_heads, d)
    mask = None
    if padded:
        pad = with_padding(rng, b, t)
        pad[1, :3] = False  # left padding: the first queries of row 1 see nothing
        mask = ops.convert_to_tensor(pad[:, None, None, :])
    bias = ops.convert_to_tensor(ref.alibi_bias(h, np.arange(t), np.arange(t)).astype("float32"))

    blocks = (0, (4, "fused"), (4, "matmul"))

    def run(q, k, v):
        return [[att._attend(q, k, v, mask=mask, causal=True, block_size=block, **kw)
                 for block in blocks] for kw in ({"bias": bias}, {})]

    (with_bias, *with_bias_blocked), (full, *blocked) = (
        [np_(t) for t in row] for row in compiled(run)(q, k, v))
    for a, b in zip(with_bias_blocked + blocked, [with_bias] * 2 + [full] * 2):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    expected_mask = np.tril(np.ones((t, t), bool))[None, None]
    if padded:
        expected_mask = expected_mask & pad[:, None, None, :]
        assert np.all(full[1, :3] == 0.0)
    expected, _ = ref.gqa_attention(q, k, v, expected_mask)
    np.testing.assert_allclose(full, expected, **TOL)


def test_blocked_policy(monkeypatch):
    """Which lengths take the blocked path; "masked" policies need a mask."""
    monkeypatch.setattr(att, "_ON_CPU", [])
    assert att._on_cpu() in (True, False)  # device detection works on this backend
    monkeypatch.setattr(att, "_ON_CPU", [True])
    monkeypatch.setattr(att, "_BLOCKED_CAUSAL", {BACKEND: (512, 256, "fused", "masked")})
    assert att._blocked_policy(511, masked=True) is None
    assert att._blocked_policy(512, masked=True) == (256, "fused")
    assert att._blocked_policy(2048, masked=False) is None
    monkeypatch.setattr(att, "_BLOCKED_CAUSAL", {BACKEND: (512, 128, "matmul")})
    assert att._blocked_policy(2048, masked=False) == (128, "matmul")
    monkeypatch.setattr(att, "_ON_CPU", [False])  # accelerators keep their fused kernels
    assert att._blocked_policy(2048, masked=True) is None


@pytest.mark.parametrize("kernel", ["fused", "matmul"])
def test_blocked_path_used_through_the_layer(rng, monkeypatch, kernel):
    """Force the blocked path in the layer; it must give the same numbers."""
    x = randn(rng, 2, 6, 8)
    pad = with_padding(rng, 2, 6)[:, None, :]  # (B, 1, T)
    layer = MultiHeadAttention(4, 4)
    full = np_(layer(x, x, use_causal_mask=True))
    full_padded = np_(layer(x, x, attention_mask=pad, use_causal_mask=True))
    monkeypatch.setattr(att, "_BLOCKED_CAUSAL", {BACKEND: (6, 4, kernel)})
    monkeypatch.setattr(att, "_ON_CPU", [True])
    calls = []
    blocked = att._blocked_causal
    monkeypatch.setattr(att, "_blocked_causal", lambda *a: calls.append(1) or blocked(*a))
    np.testing.assert_allclose(np_(layer(x, x, use_causal_mask=True)), full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np_(layer(x, x, attention_mask=pad, use_causal_mask=True)),
                               full_padded, rtol=1e-6, atol=1e-6)
    assert len(calls) == 2  # the blocked path was taken


# ---------------------------------------------------------------------------
# MultiHeadAttention against float64 NumPy and against Keras.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    dict(),
    dict(num_kv_heads=2, value_dim=6),
    dict(num_kv_heads=1, use_bias=False),
    dict(rotary=True, num_kv_heads=2),
    dict(alibi=True),
    dict(sliding_window=3),
])
def test_layer_matches_reference(rng, config):
    b, t, c, h, d = 2, 6, 8, 4, 4
    x = randn(rng, b, t, c)
    pad = with_padding(rng, b, t)
    layer = MultiHeadAttention(h, d, **config)
    layer.build((b, t, c), (b, t, c))
    randomize(layer, rng)

    def run(x):
        kw = dict(attention_mask=pad[:, None, :], use_causal_mask=True)
        return layer(x, x, return_attention_scores=True, **kw), layer(x, x, **kw)

    (out, w), fused = compiled(run)(x)  # explicit path (scores), then fused path
    mask = np.tril(np.ones((t, t), bool))[None] & pad[:, None, :]
    if config.get("sliding_window"):
        mask = mask & ref.sliding_window_mask(t, t, config["sliding_window"])[None]
    bias = ref.alibi_bias(h, np.arange(t), np.arange(t)) if config.get("alibi") else None
    expected, expected_w = ref.multi_head_attention(
        x, x, weights_of(layer), mask=mask, bias=bias, query_positions=np.arange(t),
        key_positions=np.arange(t), rotary_wavelength=10000 if config.get("rotary") else None)
    np.testing.assert_allclose(np_(out), expected, **TOL)
    np.testing.assert_allclose(np_(w), expected_w, **TOL)
    np.testing.assert_allclose(np_(fused), expected, **TOL)


def _embedded(ids, emb):
    """Float embeddings of ids, with the Keras padding mask attached."""
    return emb(ops.convert_to_tensor(ids))


@pytest.mark.parametrize("case", ["self_causal", "self_padding", "cross_padding",
                                  "explicit_mask", "key_differs", "scores"])
def test_matches_keras_multi_head_attention(rng, case):
    b, tq, tk, c, h, d = 2, 6, 5, 8, 4, 4
    if case.startswith("self") or case == "scores":
        tk = tq
    ids_q = rng.integers(1, 20, size=(b, tq))
    ids_k = rng.integers(1, 20, size=(b, tk))
    if case in ("self_padding", "scores"):
        ids_q = ids_q * with_padding(rng, b, tq)
        ids_k = ids_q
    if case == "cross_padding":
        ids_k = ids_k * with_padding(rng, b, tk)
    emb = keras.layers.Embedding(20, c, mask_zero=True)
    ours, theirs = MultiHeadAttention(h, d), keras.layers.MultiHeadAttention(h, d)
    query, value = _embedded(ids_q, emb), _embedded(ids_k, emb)
    key = _embedded(rng.integers(1, 20, size=(b, tk)), emb) if case == "key_differs" else None
    kwargs = dict(use_causal_mask=case in ("self_causal", "self_padding", "scores"))
    if case == "explicit_mask":
        kwargs["attention_mask"] = random_mask(rng, (b, tq, tk))
    if case == "scores":
        kwargs["return_attention_scores"] = True
    theirs_out = theirs(query, value, key=key, **kwargs)
    ours.build(tuple(query.shape), tuple(value.shape))
    copy_weights(theirs, ours)
    query, value = _embedded(ids_q, emb), _embedded(ids_k, emb)  # masks are re-attached
    ours_out = ours(query, value, key=key, **kwargs)
    if case == "scores":
        (ours_out, ours_w), (theirs_out, theirs_w) = ours_out, theirs_out
    real = ids_q != 0  # Keras also masks padded *queries*; we only mask keys
    np.testing.assert_allclose(np_(ours_out)[real], np_(theirs_out)[real], **TOL)
    if case == "scores":
        np.testing.assert_allclose(np_(ours_w)[real[:, None].repeat(h, 1)],
                                   np_(theirs_w)[real[:, None].repeat(h, 1)], **TOL)


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_keras_grouped_query_attention(rng, kv_heads, masked):
    b, t, c, h, d = 2, 6, 8, 4, 4
    x, m = randn(rng, b, t, c), randn(rng, b, 5, c)
    theirs = keras.layers.GroupQueryAttention(head_dim=d, num_query_heads=h,
                                                num_key_value_heads=kv_heads)
    ours = MultiHeadAttention(h, d, num_kv_heads=kv_heads)
    mask = random_mask(rng, (b, t, t)) if masked else None
    expected = theirs(x, x, attention_mask=mask, use_causal_mask=True)
    ours.build(x.shape, x.shape)
    copy_weights(theirs, ours)
    out = ours(x, x, attention_mask=mask, use_causal_mask=True)
    np.testing.assert_allclose(np_(out), np_(expected), **TOL)
    # Cross-attention, no causal mask.
    cross_ours = MultiHeadAttention(h, d, num_kv_heads=kv_heads)
    cross_theirs = keras.layers.GroupQueryAttention(head_dim=d, num_query_heads=h,
                                                      num_key_value_heads=kv_heads)
    expected = cross_theirs(x, m)
    cross_ours.build(x.shape, m.shape)
    copy_weights(cross_theirs, cross_ours)
    np.testing.assert_allclose(np_(cross_ours(x, m)), np_(expected), **TOL)


# ---------------------------------------------------------------------------
# KV cache.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    dict(stacked=True),
    dict(num_kv_heads=2, rotary=True),
    dict(num_kv_heads=1, alibi=True),
    dict(sliding_window=3),
])
def test_cached_steps_equal_full_pass(rng, config):
    config = dict(config)
    stacked = config.pop("stacked", False)
    b, t, c, h, d, max_len = 2, 6, 8, 4, 4, 9
    x = randn(rng, b, t, c)
    layer = MultiHeadAttention(h, d, **config)
    layer.build((b, t, c), (b, t, c))
    randomize(layer, rng)
    full = np_(compiled(lambda x: layer(x, x, use_causal_mask=True))(x))
    cache = layer.init_cache(b, max_len, stacked=stacked)
    step = compiled(lambda chunk, cache, index: layer(
        chunk, chunk, use_causal_mask=True, cache=cache, cache_index=index))
    pieces = []
    # A prefill of 3 tokens, then one token at a time (cache_index as a tensor).
    for lo, hi in [(0, 3)] + [(i, i + 1) for i in range(3, t)]:
        out, cache = step(x[:, lo:hi], cache, ops.convert_to_tensor(lo, "int32"))
        pieces.append(np_(out))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, **TOL)
    written = np_(cache[0] if not stacked else cache[:, 0])
    assert np.all(written[:, t:] == 0.0)  # nothing written past the last token


def test_cache_with_padding_and_scores(rng):
    """Padding of cached keys via attention_mask; scores over the whole cache."""
    b, t, c, h, d, max_len = 2, 6, 8, 4, 4, 9
    x = randn(rng, b, t, c)
    pad = with_padding(rng, b, t, min_len=2)
    layer = MultiHeadAttention(h, d)
    full = np_(layer(x, x, attention_mask=pad[:, None, :], use_causal_mask=True))
    cache = layer.init_cache(b, max_len)
    key_mask = np.zeros((b, max_len), bool)
    key_mask[:, :t] = pad
    for i in range(t):
        out, w, cache = layer(x[:, i:i + 1], x[:, i:i + 1], attention_mask=key_mask[:, None, :],
                              use_causal_mask=True, cache=cache, cache_index=i,
                              return_attention_scores=True)
        assert tuple(w.shape) == (b, h, 1, max_len)
        assert np.all(np_(w)[..., i + 1:] == 0.0)
        np.testing.assert_allclose(np_(out)[:, 0], full[:, i], **TOL)


def test_cached_step_compiles(rng):
    """One cached decoding step traces with a tensor cache_index (static shapes)."""
    b, c, max_len = 2, 8, 6
    layer = MultiHeadAttention(4, 4, num_kv_heads=1, rotary=True)
    x = randn(rng, b, max_len, c)
    full = np_(layer(x, x, use_causal_mask=True))

    def step(token, cache, index):
        return layer(token, token, use_causal_mask=True, cache=cache, cache_index=index)

    if BACKEND == "jax":
        import jax

        step = jax.jit(step)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        step = tf.function(step, jit_compile=True)
    cache = layer.init_cache(b, max_len)
    for i in range(max_len):
        out, cache = step(ops.convert_to_tensor(x[:, i:i + 1]), cache,
                          ops.convert_to_tensor(i, "int32"))
        np.testing.assert_allclose(np_(out)[:, 0], full[:, i], **TOL)


# ---------------------------------------------------------------------------
# SelfAttention, CrossAttention, InteractingAttention.
# ---------------------------------------------------------------------------
def test_self_attention_reads_keras_mask(rng):
    b, t, c = 2, 6, 8
    ids = rng.integers(1, 9, size=(b, t)) * with_padding(rng, b, t)
    emb = keras.layers.Embedding(9, c, mask_zero=True)
    layer = SelfAttention(4, 4)
    out = layer(emb(ids))
    pad = ids != 0
    explicit = layer(emb(ids), padding_mask=pad)
    x = np_(emb(ids))
    mask = np.tril(np.ones((t, t), bool))[None] & pad[:, None, :]
    expected, _ = ref.multi_head_attention(x, x, weights_of(layer), mask=mask)
    np.testing.assert_allclose(np_(out), expected, **TOL)
    np.testing.assert_allclose(np_(explicit), expected, **TOL)
    # The output carries the input's Keras mask.
    assert att._keras_mask(out) is not None
    np.testing.assert_array_equal(np_(att._keras_mask(out)), pad)
    bidirectional = SelfAttention(4, 4, causal=False)
    bidirectional.build((b, t, c))
    expected, _ = ref.multi_head_attention(x, x, weights_of(bidirectional),
                                           mask=np.broadcast_to(pad[:, None, :], (b, t, t)))
    np.testing.assert_allclose(np_(bidirectional(emb(ids))), expected, **TOL)


def test_cross_attention_encoder_padding(rng):
    b, tdec, tenc, c = 2, 6, 5, 8
    x = randn(rng, b, tdec, c)
    enc_ids = rng.integers(1, 9, size=(b, tenc)) * with_padding(rng, b, tenc)
    memory = keras.layers.Embedding(9, c, mask_zero=True)(enc_ids)
    layer = CrossAttention(4, 4)
    out = layer(x, memory)  # the Keras mask of memory
    weights = np_(layer.last_attention_weights)
    assert weights.shape == (b, 4, tdec, tenc)
    enc_pad = enc_ids != 0
    assert np.all(weights[np.broadcast_to(~enc_pad[:, None, None, :], weights.shape)] == 0.0)
    expected, expected_w = ref.multi_head_attention(
        x, np_(memory), weights_of(layer), mask=enc_pad[:, None, :])
    np.testing.assert_allclose(np_(out), expected, **TOL)
    np.testing.assert_allclose(weights, expected_w, **TOL)
    explicit = layer(x, np_(memory), encoder_padding_mask=enc_pad)
    np.testing.assert_allclose(np_(explicit), expected, **TOL)
    # Against Keras, weights copied; and with a precomputed (read-only) memory cache.
    theirs = keras.layers.MultiHeadAttention(4, 4)
    theirs(x, np_(memory))
    copy_weights(layer, theirs)
    np.testing.assert_allclose(
        np_(theirs(x, np_(memory), attention_mask=enc_pad[:, None, :])), expected, **TOL)
    fast = CrossAttention(4, 4, keep_attention_weights=False)
    fast.build(x.shape, memory.shape)
    copy_weights(layer, fast)
    cached, _ = fast(x, None, encoder_padding_mask=enc_pad, cache=fast.memory_cache(np_(memory)))
    np.testing.assert_allclose(np_(cached), expected, **TOL)


@pytest.mark.parametrize("mode", ["sequential", "parallel", "joint"])
def test_interacting_attention_modes(rng, mode):
    b, tdec, tenc, c, h, d = 2, 6, 5, 8, 4, 4
    x, m = randn(rng, b, tdec, c), randn(rng, b, tenc, c)
    dec_pad, enc_pad = with_padding(rng, b, tdec), with_padding(rng, b, tenc)
    layer = InteractingAttention(h, d, mode=mode)
    out = np_(layer(x, m, decoder_padding_mask=dec_pad, encoder_padding_mask=enc_pad))
    assert out.shape == (b, tdec, c)
    causal = np.tril(np.ones((tdec, tdec), bool))[None] & dec_pad[:, None, :]
    cross = np.broadcast_to(enc_pad[:, None, :], (b, tdec, tenc))
    if mode == "joint":
        joint = ref.joint_attention_mask(dec_pad, enc_pad)
        expected, w = ref.multi_head_attention(x, np.concatenate([m, x], 1),
                                               weights_of(layer.joint_attention), mask=joint)
        # One softmax over memory and past together: each row sums to 1 over both.
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)
    else:
        own, _ = ref.multi_head_attention(x, x, weights_of(layer.self_attention), mask=causal)
        q = x + own if mode == "sequential" else x
        other, _ = ref.multi_head_attention(q, m, weights_of(layer.cross_attention), mask=cross)
        expected = other if mode == "sequential" else own + other
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-5)


def test_interacting_attention_rejects_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        InteractingAttention(2, 4, mode="sum")


# ---------------------------------------------------------------------------
# Keras idioms: symbolic call, save/load, fit, mixed precision, config.
# ---------------------------------------------------------------------------
B, T, TENC, C = 2, 6, 5, 8
KINDS = ["mha", "self", "cross", "sequential", "parallel", "joint"]


def apply_layer(kind, x, m):
    """Call one of our layers (``kind``) on decoder states ``x`` and memory ``m``."""
    if kind == "mha":
        return MultiHeadAttention(4, 4, num_kv_heads=1, rotary=True, alibi=True, dropout=0.1,
                                  name="mha")(x, x, use_causal_mask=True)
    if kind == "self":
        return SelfAttention(4, 4, sliding_window=4, name="self")(x)
    if kind == "cross":
        return CrossAttention(4, 4, num_kv_heads=2, name="cross")(x, m)
    return InteractingAttention(4, 4, mode=kind, name=kind)(x, m)


def build_model(kinds):
    """A small functional model, token ids in and logits out, around ``kinds``.

    The layers are chained (``keras.layers.Add`` keeps the Keras mask), so one
    model exercises several of them with one compile.
    """
    dec = keras.Input((T,), dtype="int32", name="dec")
    enc = keras.Input((TENC,), dtype="int32", name="enc")
    x = keras.layers.Embedding(16, C, mask_zero=True, name="dec_emb")(dec)
    m = keras.layers.Embedding(16, C, mask_zero=True, name="enc_emb")(enc)
    for kind in kinds:
        x = keras.layers.Add()([x, apply_layer(kind, x, m)])
    y = keras.layers.Dense(16, name="logits")(x)
    return keras.Model([dec, enc], y)


def model_inputs(rng):
    data = {"dec": rng.integers(1, 16, size=(B, T)), "enc": rng.integers(1, 16, size=(B, TENC))}
    data["dec"][0, -2:] = 0
    data["enc"][1, -1:] = 0
    return {k: v.astype("int32") for k, v in data.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_symbolic_eager_and_save_load(rng, kind, tmp_path):
    """A symbolic (functional) build, an eager call, and a ``.keras`` round trip."""
    model = build_model([kind])
    assert tuple(model.output.shape) == (None, T, 16)
    data = model_inputs(rng)
    eager = np_(model(data))
    assert eager.shape == (B, T, 16) and np.all(np.isfinite(eager))
    path = str(tmp_path / f"{kind}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.get_layer(kind)) is type(model.get_layer(kind))
    np.testing.assert_allclose(np_(loaded(data)), eager, rtol=1e-6, atol=1e-6)


FIT_KINDS = ["mha", "self", "cross", "joint"]


def test_fit_step_every_layer(rng):
    """One ``fit`` step (``jit_compile=True`` on TensorFlow and JAX) through every layer.

    ``InteractingAttention`` is fitted in ``joint`` mode; ``sequential`` and
    ``parallel`` are compositions of ``SelfAttention`` and ``CrossAttention``,
    fitted here, and one compile of this model is the slowest part of the file.
    """
    model = build_model(FIT_KINDS)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=JIT,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data, labels = model_inputs(rng), rng.integers(0, 16, size=(B, T)).astype("int32")
    before = {w.path: np_(w).copy() for w in model.trainable_weights}
    history = model.fit(data, labels, batch_size=B, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    for kind in FIT_KINDS:  # every layer was trained (a key bias gets no gradient: skip it)
        changed = [not np.allclose(np_(w), before[w.path])
                   for w in model.get_layer(kind).trainable_weights
                   if not w.path.endswith("key/bias")]
        assert changed and all(changed), kind


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(rng, policy):
    keras.config.set_dtype_policy(policy)
    model = build_model(KINDS)
    out = compiled(model)(model_inputs(rng))
    assert np.all(np.isfinite(np_(ops.cast(out, "float32"))))
    for kind in KINDS:
        layer = model.get_layer(kind)
        assert layer.compute_dtype == policy.split("_")[1]
        assert all(w.dtype == "float32" for w in layer.trainable_weights)


def test_mixed_precision_cache(rng):
    keras.config.set_dtype_policy("mixed_float16")
    layer = MultiHeadAttention(4, 4, rotary=True)
    x = ops.cast(randn(rng, 2, 4, 8), "float16")
    full = np_(ops.cast(layer(x, x, use_causal_mask=True), "float32"))
    cache = layer.init_cache(2, 4)
    assert keras.backend.standardize_dtype(cache[0].dtype) == "float16"
    for i in range(4):
        out, cache = layer(x[:, i:i + 1], x[:, i:i + 1], use_causal_mask=True, cache=cache,
                           cache_index=i)
        np.testing.assert_allclose(np_(ops.cast(out, "float32"))[:, 0], full[:, i],
                                   rtol=2e-2, atol=2e-2)  # float16: ~3 digits


@pytest.mark.parametrize("cls,kwargs", [
    (MultiHeadAttention, dict(num_heads=4, key_dim=3, num_kv_heads=2, value_dim=5, dropout=0.1,
                              use_bias=False, rotary=False, alibi=True, sliding_window=7,
                              seed=3)),
    (SelfAttention, dict(num_heads=2, key_dim=4, causal=False, rotary=True)),
    (CrossAttention, dict(num_heads=2, key_dim=4, keep_attention_weights=False)),
    (InteractingAttention, dict(num_heads=2, key_dim=4, mode="joint", num_kv_heads=1)),
])
def test_get_config_round_trip(cls, kwargs):
    layer = cls(**kwargs)
    config = layer.get_config()
    for key, value in kwargs.items():
        assert config[key] == value
    clone = cls.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is cls


def test_weight_names_are_stable():
    layer = MultiHeadAttention(4, 4, num_kv_heads=1, value_dim=3)
    layer.build((None, 6, 8), (None, 5, 6))
    names = [w.path.split("/", 1)[1] for w in layer.weights]
    assert names == ["query/kernel", "query/bias", "key/kernel", "key/bias",
                     "value/kernel", "value/bias", "attention_output/kernel",
                     "attention_output/bias"]
    assert [tuple(w.shape) for w in layer.weights] == [
        (8, 4, 4), (4, 4), (6, 1, 4), (1, 4), (6, 1, 3), (1, 3), (4, 3, 8), (8,)]
