"""Attention: the scaled dot product, multi-head attention, and the decoder's
three kinds of attention (self, cross, and the article's "interacting" one).

Shapes used in the docstrings (CONVENTIONS §2):

* ``B``: batch size; ``Tq`` queries, ``Tk`` keys; ``T`` when they are equal;
* ``H``: query heads, ``Hkv``: key/value heads (``H % Hkv == 0``; ``Hkv == H``
  is multi-head, ``1 < Hkv < H`` grouped-query (GQA), ``Hkv == 1`` multi-query
  (MQA) attention);
* ``D``: key (and query) size per head, ``Dv``: value size per head;
* ``C``: the model width (features of the query input).

Attention tensors are ``(B, T, H, D)``, the layout of
``keras.ops.dot_product_attention``; attention weights are ``(B, H, Tq, Tk)``.
Masks are boolean and ``True`` means "this query may attend to this key".

What this module adds to Keras (each piece is tested against Keras or NumPy):

* **fully masked rows give exactly 0**, on both the fused and the explicit
  path, on every backend and dtype, with finite gradients;
* **offset (bottom-right) causal alignment**, so that a KV cache works;
* **the mask is honoured on every path**, including dropout and returned weights;
* a **KV cache** with static shapes, **GQA/MQA**, **RoPE**, **ALiBi**, and a
  **sliding window**;
* a **blocked causal path** that skips most of the masked upper triangle.
"""

import math

import keras
from keras import ops

from keras_decoder._calls import call_layer, in_place_cache_writes
from keras_decoder import masks as _masks
from keras_decoder.inputs import RotaryEmbedding

__all__ = [
    "scaled_dot_product_attention",
    "MultiHeadAttention",
    "SelfAttention",
    "CrossAttention",
    "InteractingAttention",
]

# ---------------------------------------------------------------------------
# Blocked causal attention: when to use it.
#
# Causal attention computed block by block (each block of queries attends only
# to the keys up to the end of its block) does about half the work of the full
# square at long lengths. It pays off only where the backend's fused kernel
# computes the whole square; torch's fused CPU kernel already skips the masked
# blocks of a plain causal mask (but not of a causal mask combined with key
# padding). Per backend: ``(min_length, block_size, kernel[, "masked"])``, the
# shortest sequence that takes the blocked path, its block size, how each
# block is computed (``"fused"``: ``keras.ops.dot_product_attention``;
# ``"matmul"``: ``(B, H, T, D)`` matmuls and a float32 softmax), and
# ``"masked"`` to block only when another mask comes with the causal one; or
# ``None`` for never. Chosen by measurement on a CPU with ``benchmarks/attention.py`` (its
# second table; the README quotes it), and used on CPUs only: accelerators have
# their own fused kernels.
# ---------------------------------------------------------------------------
_BLOCKED_CAUSAL = {"tensorflow": (512, 256, "fused"), "jax": (512, 128, "matmul"),
                   "torch": (512, 256, "fused", "masked")}
_ON_CPU = []


def _on_cpu():
    """Whether Keras computes on the CPU (no accelerator). Asked once."""
    if not _ON_CPU:
        try:
            devices = [str(d) for d in keras.distribution.list_devices()]
        except Exception:  # torch: no distribution API; ask where a tensor lands
            devices = [str(getattr(ops.zeros(()), "device", "cpu"))]
        _ON_CPU.append(all("cpu" in d.lower() for d in devices))
    return _ON_CPU[0]


def _blocked_policy(length, masked):
    """``(block_size, kernel)`` for a causal length, or ``None`` for the fused path.

    ``masked``: whether a mask (key padding...) comes with the causal one. A
    policy whose 4th entry is ``"masked"`` blocks only then: the fused kernel
    skips the upper triangle of a plain causal mask by itself (torch).
    """
    policy = _BLOCKED_CAUSAL.get(keras.backend.backend())
    if policy is None or length is None or length < policy[0] or not _on_cpu():
        return None
    if policy[3:] == ("masked",) and not masked:
        return None
    return policy[1], policy[2]


def _fused_supports(dtype):
    """Whether ``keras.ops.dot_product_attention`` compiles for ``dtype`` here.

    JAX on CPU cannot compile it in float16 (XLA: "precision F16_F16_F32 is
    not supported by dot_general on CPU"), so that case takes the explicit path.
    """
    if keras.backend.backend() != "jax" or keras.backend.standardize_dtype(dtype) != "float16":
        return True
    return not _on_cpu()


# ---------------------------------------------------------------------------
# Private helpers: shapes, masks, and the two paths.
# ---------------------------------------------------------------------------
def _shape(x):
    return tuple(x.shape)


def _same(a, b):
    return a is None or b is None or a == b


try:  # the accessor KerasHub uses; it also finds masks of tensors without __dict__
    from keras.src.backend import get_keras_mask as _get_keras_mask
except ImportError:  # pragma: no cover - another Keras layout

    def _get_keras_mask(x):
        return getattr(x, "_keras_mask", None)


def _keras_mask(x):
    """The Keras mask attached to ``x`` (``x._keras_mask``), or ``None``."""
    return None if x is None else _get_keras_mask(x)


def _to_4d(mask, expected, name):
    """Check ``mask`` against ``expected = (B, H, Tq, Tk)`` and make it rank 4.

    Accepted: ``(Tq, Tk)``, ``(B, Tq, Tk)``, ``(B, H, Tq, Tk)``, each size
    either equal to the expected one or 1. Returns ``(B|1, H|1, Tq|1, Tk|1)``.
    """
    if mask is None:
        return None
    if not isinstance(mask, keras.KerasTensor):
        mask = ops.convert_to_tensor(mask)
    shape = _shape(mask)
    rank = len(shape)
    names = {2: "(query_len, key_len)", 3: "(batch, query_len, key_len)",
             4: "(batch, num_heads, query_len, key_len)"}
    targets = {2: expected[2:], 3: (expected[0],) + expected[2:], 4: expected}
    ok = rank in targets and all(
        d is None or d == 1 or _same(d, e) for d, e in zip(shape, targets[rank])
    )
    if not ok:
        want = targets.get(rank, expected[:1] + expected[2:])
        raise ValueError(
            f"Expected {'an attention mask' if name != 'bias' else 'a bias'} "
            f"broadcastable to {names.get(rank, names[3])} = {want} "
            f"(or to (batch, num_heads, query_len, key_len) = {expected}, or "
            f"(query_len, key_len) = {expected[2:]}). "
            f"Received: {name}.shape={shape}"
        )
    if rank == 2:
        mask = ops.reshape(mask, (1, 1) + shape)
    elif rank == 3:
        mask = ops.expand_dims(mask, 1)
    return mask


def _and(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return ops.logical_and(a, b)


def _as_bool(mask):
    if mask is None:
        return None
    return mask if keras.backend.standardize_dtype(mask.dtype) == "bool" else (
        ops.not_equal(mask, 0)
    )


def _causal_4d(query_len, key_len):
    return ops.reshape(_masks.causal_mask(query_len, key_len), (1, 1, query_len, key_len))


def _row_valid(mask, causal, query_len):
    """Which query rows may attend to at least one key: ``(B|1, H|1, Tq)``.

    ``None`` when no row can be empty (no mask: a causal row always sees itself).
    With a causal mask and a key-only mask ``(b, h, 1, T)`` (key padding) the
    answer is a running OR over keys, ``O(T)`` instead of ``O(T^2)``.
    """
    if mask is None:
        return None
    if causal and mask.shape[2] == 1 and mask.shape[3] == query_len:
        seen = ops.cumsum(ops.cast(mask, "int32"), axis=-1)  # (b, h, 1, T)
        return ops.greater(seen[:, :, 0, :], 0)
    if causal:
        mask = ops.logical_and(mask, _causal_4d(query_len, query_len))
    return ops.any(mask, axis=-1)


def _zero_empty_rows(output, valid):
    """``output`` ``(B, Tq, H, Dv)``; ``valid`` ``(b, h, Tq)`` -> rows with no key become 0."""
    if valid is None:
        return output
    valid = ops.expand_dims(ops.transpose(valid, (0, 2, 1)), -1)  # (b, Tq, h, 1)
    return ops.where(valid, output, ops.zeros((), output.dtype))


def _fused(query, key, value, mask, bias, scale, causal):
    """``keras.ops.dot_product_attention``, plus GQA repeat and zeroed empty rows.

    ``causal`` requires ``Tq == Tk`` (Keras aligns it top-left). A bias and a
    mask are merged into one bias (torch accepts only one of them).
    """
    heads, kv_heads = query.shape[2], key.shape[2]
    if heads != kv_heads:
        key = ops.repeat(key, heads // kv_heads, axis=2)  # (B, Tk, H, D)
        value = ops.repeat(value, heads // kv_heads, axis=2)  # (B, Tk, H, Dv)
    valid = _row_valid(mask, causal, query.shape[1])
    if bias is not None:
        if causal:
            mask = _and(mask, _causal_4d(query.shape[1], key.shape[1]))
            causal = False
        if mask is not None:
            neg = _masks.large_negative(query.dtype)
            bias = ops.where(mask, ops.cast(bias, query.dtype), ops.full((), neg, query.dtype))
            mask = None
    output = ops.dot_product_attention(
        query, key, value, bias=bias, mask=mask, scale=scale, is_causal=causal
    )  # (B, Tq, H, Dv)
    return _zero_empty_rows(output, valid)


def _explicit(query, key, value, mask, bias, scale, dropout_rate, training, seed):
    """Einsum, float32 softmax, einsum: the path that can return weights and drop out.

    Returns ``(output (B, Tq, H, Dv), weights (B, H, Tq, Tk) float32)``. The
    weights of a row with no visible key are all 0, so its output is 0.
    """
    batch, q_len, heads, depth = _shape(query)
    k_len, kv_heads = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    batch = ops.shape(query)[0]
    q = ops.reshape(query, (batch, q_len, kv_heads, groups, depth))
    logits = ops.einsum("bqhgd,bkhd->bhgqk", q, key)  # (B, Hkv, G, Tq, Tk)
    logits = ops.reshape(logits, (batch, heads, q_len, k_len))  # (B, H, Tq, Tk)
    logits = ops.multiply(ops.cast(logits, "float32"), scale)
    if bias is not None:
        logits = ops.add(logits, ops.cast(bias, "float32"))
    if mask is not None:
        logits = ops.where(mask, logits, _masks.large_negative("float32"))
    weights = ops.softmax(logits, axis=-1)  # float32
    if mask is not None:
        weights = ops.where(ops.any(mask, axis=-1, keepdims=True), weights, 0.0)
    dropped = weights
    if dropout_rate > 0.0 and training:
        dropped = keras.random.dropout(weights, dropout_rate, seed=seed)
    dropped = ops.reshape(
        ops.cast(dropped, value.dtype), (batch, kv_heads, groups, q_len, k_len)
    )
    output = ops.einsum("bhgqk,bkhd->bqhgd", dropped, value)  # (B, Tq, Hkv, G, Dv)
    output = ops.reshape(output, (batch, q_len, heads, value.shape[-1]))
    return output, weights


def _slice(t, q_lo, q_hi, k_hi):
    """Rows ``q_lo:q_hi`` and keys ``:k_hi`` of a ``(b, h, Tq|1, Tk)`` tensor."""
    if t is None:
        return None
    if t.shape[2] != 1:
        t = t[:, :, q_lo:q_hi]
    return t[:, :, :, :k_hi]


def _blocked_causal(query, key, value, mask, bias, scale, block_size, kernel="fused"):
    """Causal attention by query blocks; block ``[lo, hi)`` sees keys ``[0, hi)``.

    Same numbers as the full square (the skipped keys have weight exactly 0),
    about half the work at long lengths. Each block's mask is
    ``causal_mask(hi - lo, hi)``: bottom-right alignment puts query ``lo + i``
    at key position ``lo + i``. ``kernel`` computes one block: ``"fused"``
    (``keras.ops.dot_product_attention``) or ``"matmul"`` (see ``_matmul_block``).
    """
    length = query.shape[1]
    if kernel == "matmul":
        heads, kv_heads = query.shape[2], key.shape[2]
        if heads != kv_heads:
            key = ops.repeat(key, heads // kv_heads, axis=2)
            value = ops.repeat(value, heads // kv_heads, axis=2)
        query = ops.transpose(query, (0, 2, 1, 3))  # (B, H, T, D)
        key = ops.transpose(key, (0, 2, 3, 1))  # (B, H, D, T): ready for q @ k
        value = ops.transpose(value, (0, 2, 1, 3))  # (B, H, T, Dv)
    outputs = []
    for lo in range(0, length, block_size):
        hi = min(lo + block_size, length)
        block_mask = _and(_causal_4d(hi - lo, hi), _slice(mask, lo, hi, hi))
        block_bias = _slice(bias, lo, hi, hi)
        if kernel == "matmul":
            outputs.append(_matmul_block(query[:, :, lo:hi], key[..., :hi], value[:, :, :hi],
                                         block_mask, block_bias, scale, mask is not None))
        else:
            outputs.append(_fused(query[:, lo:hi], key[:, :hi], value[:, :hi], block_mask,
                                  block_bias, scale, causal=False))
    if kernel == "matmul":
        return ops.transpose(ops.concatenate(outputs, axis=2), (0, 2, 1, 3))  # (B, T, H, Dv)
    return ops.concatenate(outputs, axis=1)  # (B, T, H, Dv)


def _matmul_block(query, key_t, value, mask, bias, scale, may_have_empty_rows):
    """One block in the ``(B, H, T, D)`` layout: ``softmax(q kᵀ) v`` with plain matmuls.

    ``query`` ``(B, H, tq, D)``, ``key_t`` ``(B, H, D, tk)``, ``value``
    ``(B, H, tk, Dv)``, ``mask`` bool ``(b, h, tq, tk)``: the causal part alone
    never empties a row; a caller's mask may. XLA on CPU runs this faster than
    the ``(B, T, H, D)`` einsums of ``jax.nn.dot_product_attention``.
    """
    scores = ops.multiply(ops.cast(ops.matmul(query, key_t), "float32"), scale)  # (B, H, tq, tk)
    if bias is not None:
        scores = ops.add(scores, ops.cast(bias, "float32"))
    scores = ops.where(mask, scores, _masks.large_negative("float32"))
    weights = ops.softmax(scores, axis=-1)
    if may_have_empty_rows:  # a row with no key gives 0, not a uniform average
        weights = ops.where(ops.any(mask, axis=-1, keepdims=True), weights, 0.0)
    return ops.matmul(ops.cast(weights, value.dtype), value)  # (B, H, tq, Dv)


def _check_qkv(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if len(_shape(t)) != 4:
            raise ValueError(
                f"Expected `{name}` of rank 4, shape (batch, seq_len, num_heads, "
                f"head_dim). Received: {name}.shape={_shape(t)}"
            )
    (b, tq, h, d), (bk, tk, hkv, dk), (bv, tv, hv, _) = (
        _shape(query), _shape(key), _shape(value))
    if not (_same(d, dk) and _same(tk, tv) and _same(hkv, hv) and _same(b, bk)
            and _same(b, bv)):
        raise ValueError(
            "Expected query (B, Tq, H, D), key (B, Tk, Hkv, D) and value "
            "(B, Tk, Hkv, Dv) with matching B, Tk, Hkv and D. Received: "
            f"query.shape={_shape(query)}, key.shape={_shape(key)}, "
            f"value.shape={_shape(value)}"
        )
    if h is None or hkv is None or h % hkv:
        raise ValueError(
            "Expected num_heads to be a multiple of num_kv_heads (GQA/MQA). "
            f"Received: query.shape={_shape(query)}, key.shape={_shape(key)}"
        )


def _attend(query, key, value, mask=None, bias=None, causal=False, scale=None,
            dropout_rate=0.0, training=False, return_weights=False, seed=None,
            block_size=None):
    """The dispatcher behind every attention in this module.

    ``mask`` is ``None`` or bool rank 4 ``(B|1, H|1, Tq|1, Tk)``; ``bias``
    likewise (float). ``causal`` is a static flag: AND the bottom-right
    ``causal_mask(Tq, Tk)``. Paths:

    * explicit (einsum) when weights are returned, dropout is active,
      ``Dv != D`` (JAX's fused op requires ``Dv == D``), or float16 on JAX's
      CPU (which cannot compile the fused op in float16);
    * blocked causal when causal, ``Tq == Tk`` and long enough for this backend;
    * fused ``keras.ops.dot_product_attention`` otherwise.
    """
    q_len, k_len = query.shape[1], key.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if causal and q_len != k_len:  # Keras's is_causal is top-left: fold our own
        mask, causal = _and(mask, _causal_4d(q_len, k_len)), False
    explicit = (
        return_weights
        or (dropout_rate > 0.0 and bool(training))
        or query.shape[-1] != value.shape[-1]  # jax's fused op needs Dv == D
        or not _fused_supports(query.dtype)
    )
    if explicit:
        if causal:
            mask = _and(mask, _causal_4d(q_len, k_len))
        output, weights = _explicit(
            query, key, value, mask, bias, scale, dropout_rate, training, seed
        )
        return (output, weights) if return_weights else output
    if block_size is None:
        block_size, kernel = _blocked_policy(q_len, mask is not None or bias is not None) or (
            0, None)
    else:  # given by a test or the benchmark: "size" or ("size", "kernel")
        block_size, kernel = block_size if isinstance(block_size, tuple) else (block_size,
                                                                               "fused")
    if causal and block_size and q_len > block_size:
        return _blocked_causal(query, key, value, mask, bias, scale, block_size, kernel)
    return _fused(query, key, value, mask, bias, scale, causal)


# ---------------------------------------------------------------------------
# The function.
# ---------------------------------------------------------------------------
def scaled_dot_product_attention(query, key, value, mask=None, *, bias=None, scale=None,
                                 dropout_rate=0.0, training=False, return_weights=False,
                                 seed=None):
    """``softmax(q kᵀ · scale + bias, masked) v``, per head, with GQA/MQA.

    Args:
        query: ``(B, Tq, H, D)``.
        key: ``(B, Tk, Hkv, D)`` with ``H % Hkv == 0``; each key/value head
            serves ``H // Hkv`` consecutive query heads (as
            ``keras.layers.GroupedQueryAttention`` repeats them).
        value: ``(B, Tk, Hkv, Dv)``.
        mask: optional bool, ``True`` = may attend. ``(Tq, Tk)``,
            ``(B, Tq, Tk)`` or ``(B, H, Tq, Tk)``, each size equal or 1.
            Any other shape raises ``ValueError``.
        bias: optional float added to the scores, same shapes as ``mask``
            (ALiBi, relative positions).
        scale: defaults to ``1 / sqrt(D)``.
        dropout_rate: dropout on the attention weights (only when ``training``).
        training: Python bool.
        return_weights: also return the weights ``(B, H, Tq, Tk)`` (float32,
            before dropout).
        seed: int or ``keras.random.SeedGenerator`` for the dropout.

    Returns:
        ``(B, Tq, H, Dv)`` in the dtype of ``query``; and the weights when
        ``return_weights``. A query row that may attend to no key gives exactly
        0 (and all-zero weights), never NaN nor a uniform average.

    The fused ``keras.ops.dot_product_attention`` path is taken when no weights
    are returned, no dropout is active and ``Dv == D``; otherwise an explicit einsum path
    with a float32 softmax. Both give the same numbers and honour the mask.
    """
    query, key, value = (t if isinstance(t, keras.KerasTensor) else ops.convert_to_tensor(t)
                         for t in (query, key, value))
    _check_qkv(query, key, value)
    expected = (query.shape[0], query.shape[2], query.shape[1], key.shape[1])
    mask = _as_bool(_to_4d(mask, expected, "mask"))
    bias = _to_4d(bias, expected, "bias")
    return _attend(query, key, value, mask, bias, False, scale, dropout_rate, training,
                   return_weights, seed)


# ---------------------------------------------------------------------------
# Position helpers: ALiBi (RoPE is inputs.RotaryEmbedding).
# ---------------------------------------------------------------------------
def _alibi_slopes(num_heads):
    """The ALiBi head slopes of Press et al.: a geometric sequence from 2^(-8/n)."""

    def powers(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return powers(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return powers(closest) + powers(2 * closest)[0::2][: num_heads - closest]


def _alibi_bias(num_heads, query_positions, key_positions):
    """``-slope_h * |i - j|``: ``(1, H, Tq, Tk)`` float32."""
    slopes = ops.reshape(ops.array(_alibi_slopes(num_heads), "float32"), (1, -1, 1, 1))
    distance = ops.abs(
        ops.cast(ops.expand_dims(query_positions, 1) - ops.expand_dims(key_positions, 0),
                 "float32")
    )  # (Tq, Tk)
    return -slopes * ops.expand_dims(ops.expand_dims(distance, 0), 0)


# ---------------------------------------------------------------------------
# The layers.
# ---------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="keras_decoder")
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention with GQA/MQA, a KV cache, RoPE, ALiBi and a window.

    A drop-in for ``keras.layers.MultiHeadAttention`` (and
    ``keras.layers.GroupedQueryAttention``) on ``(B, T, C)`` inputs: the four
    ``EinsumDense`` sublayers are named ``query``, ``key``, ``value`` and
    ``attention_output`` and have the same kernel shapes, so weights copy
    one-to-one (and LoRA or layout maps can address them by name):

    * ``query``: kernel ``(C, H, D)``, bias ``(H, D)``;
    * ``key``: kernel ``(Ckv, Hkv, D)``, bias ``(Hkv, D)``;
    * ``value``: kernel ``(Ckv, Hkv, Dv)``, bias ``(Hkv, Dv)``;
    * ``attention_output``: kernel ``(H, Dv, C)``, bias ``(C,)``.

    Differences from Keras, on purpose (CONVENTIONS §1):

    * Only **keys** are masked by padding (the Keras mask of ``value`` and
      ``key``); the Keras mask of ``query`` is passed on to the output, not
      used to mask query rows. A row that sees no key gives 0.
    * The causal mask is bottom-right aligned (``masks.causal_mask``).

    Args:
        num_heads: ``H``.
        key_dim: ``D``, the size of each query/key head.
        num_kv_heads: ``Hkv`` (defaults to ``H``); ``H % Hkv == 0``.
        value_dim: ``Dv`` (defaults to ``D``).
        dropout: dropout rate on the attention weights.
        use_bias: whether the projections have biases.
        rotary: apply RoPE (``max_wavelength=10000``) to queries and keys at
            their absolute positions.
        alibi: add the ALiBi bias ``-slope_h * |i - j|``.
        sliding_window: ``W``: query at position ``p`` sees keys
            ``p - W < j <= p`` (a causal band; implies causal masking).
        seed: seed of the dropout.
        **kwargs: ``Layer`` arguments (``name``, ``dtype``...).

    Call arguments:
        query: ``(B, Tq, C)``.
        value: ``(B, Tk, Ckv)``.
        key: ``(B, Tk, Ckv)``; defaults to ``value``.
        attention_mask: bool, ``(B, Tq, Tk)``, ``(Tq, Tk)`` or
            ``(B, H, Tq, Tk)``; ``True`` = may attend. With a cache,
            ``Tk = max_len``.
        use_causal_mask: AND a causal mask (offset by ``cache_index`` with a
            cache, bottom-right aligned without).
        cache: the KV cache (CONVENTIONS §2), either a tuple
            ``(key_cache, value_cache)`` of shapes ``(B, max_len, Hkv, D)`` and
            ``(B, max_len, Hkv, Dv)``, or one stacked tensor
            ``(B, 2, max_len, Hkv, D)`` (KerasHub's layout; needs ``D == Dv``).
            :meth:`init_cache` makes an empty one. It is returned in the form
            it was given.
        cache_index: scalar int (Python or tensor), the position of the first
            new token. The new keys/values are written at
            ``[cache_index, cache_index + Tq)`` with ``ops.slice_update``;
            queries attend to the whole cache (static shapes), with every key
            at position ``>= cache_index + Tq`` masked (and, when causal, every
            key after the query's own position). With ``cache`` but no
            ``cache_index`` the cache is read-only precomputed keys/values
            (cross-attention): ``key``/``value`` are not used.
        return_attention_scores: also return the weights ``(B, H, Tq, Tk)``.
        training: Python bool, for dropout.

    Returns:
        ``output`` ``(B, Tq, C)``; ``(output, weights)`` with
        ``return_attention_scores``; and the cache appended last when a
        cache is given: ``(output, cache)`` or ``(output, weights, cache)``.
        With a cache the value's Keras mask ``(B, Tq)`` masks the new keys
        only; pass padding of earlier positions as ``attention_mask``.

    Example:

    >>> x = keras.random.normal((2, 5, 16))
    >>> mha = MultiHeadAttention(num_heads=4, key_dim=8, num_kv_heads=2)
    >>> mha(x, x, use_causal_mask=True).shape
    (2, 5, 16)
    """

    def __init__(self, num_heads, key_dim, num_kv_heads=None, value_dim=None, dropout=0.0,
                 use_bias=True, rotary=False, alibi=False, sliding_window=None, seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                "Expected num_heads to be a multiple of num_kv_heads. "
                f"Received: num_heads={num_heads}, num_kv_heads={num_kv_heads}"
            )
        if rotary and key_dim % 2:
            raise ValueError(f"Expected an even key_dim for RoPE. Received: key_dim={key_dim}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(
                f"Expected sliding_window >= 1 or None. Received: sliding_window={sliding_window}"
            )
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.num_kv_heads = num_kv_heads
        self.value_dim = key_dim if value_dim is None else value_dim
        self.dropout = dropout
        self.use_bias = use_bias
        self.rotary = rotary
        self.alibi = alibi
        self.sliding_window = sliding_window
        self.seed = seed
        self.supports_masking = True
        self.seed_generator = keras.random.SeedGenerator(seed) if dropout > 0 else None
        self._query_dense = self._projection("query", num_heads, key_dim)
        self._key_dense = self._projection("key", num_kv_heads, key_dim)
        self._value_dense = self._projection("value", num_kv_heads, self.value_dim)
        self._output_dense = None  # its width is the query's: made in build()
        self._rotary = self._make_rotary() if rotary else None

    # -- construction -----------------------------------------------------
    def _projection(self, name, heads, size):
        layer = keras.layers.EinsumDense(
            # (B, T, C) x (C, H, D) -> (B, T, H, D). Letters in the order of the
            # dimensions: torch.einsum then needs no transposing copies.
            "abc,cde->abde",
            output_shape=(None, heads, size),
            bias_axes="de" if self.use_bias else None,
            name=name,
            dtype=self.dtype_policy,
        )
        layer.supports_masking = True  # carry the input's Keras mask, no warning
        return layer

    def _make_rotary(self):
        """``inputs.RotaryEmbedding``, applied to queries and keys ``(B, T, H, D)``."""
        layer = RotaryEmbedding(max_wavelength=10000, dtype=self.dtype_policy)
        layer.supports_masking = True  # the projected heads carry the input's mask
        return layer

    def build(self, query_shape, value_shape, key_shape=None):
        key_shape = value_shape if key_shape is None else key_shape
        for name, shape in (("query", query_shape), ("value", value_shape), ("key", key_shape)):
            if len(shape) != 3:
                raise ValueError(
                    f"Expected `{name}` of rank 3, shape (batch, seq_len, features). "
                    f"Received: {name}.shape={tuple(shape)}"
                )
        self._query_dense.build(query_shape)
        self._key_dense.build(key_shape)
        self._value_dense.build(value_shape)
        self._output_dense = keras.layers.EinsumDense(
            "abcd,cde->abe",  # (B, T, H, Dv) x (H, Dv, C) -> (B, T, C)
            output_shape=(None, query_shape[-1]),
            bias_axes="e" if self.use_bias else None,
            name="attention_output",
            dtype=self.dtype_policy,
        )
        self._output_dense.build((query_shape[0], query_shape[1], self.num_heads,
                                  self.value_dim))
        self.built = True

    # Properties with Keras's names, so that copying weights reads the same.
    @property
    def query_dense(self):
        return self._query_dense

    @property
    def key_dense(self):
        return self._key_dense

    @property
    def value_dense(self):
        return self._value_dense

    @property
    def output_dense(self):
        return self._output_dense

    def init_cache(self, batch_size, max_length, dtype=None, stacked=False):
        """An empty KV cache: ``(key (B, max_len, Hkv, D), value (B, max_len, Hkv, Dv))``
        of zeros, or one ``(B, 2, max_len, Hkv, D)`` tensor when ``stacked``."""
        dtype = dtype or self.compute_dtype
        if stacked:
            if self.key_dim != self.value_dim:
                raise ValueError(
                    "Expected key_dim == value_dim for a stacked cache. Received: "
                    f"key_dim={self.key_dim}, value_dim={self.value_dim}"
                )
            return ops.zeros((batch_size, 2, max_length, self.num_kv_heads, self.key_dim), dtype)
        return (ops.zeros((batch_size, max_length, self.num_kv_heads, self.key_dim), dtype),
                ops.zeros((batch_size, max_length, self.num_kv_heads, self.value_dim), dtype))

    # -- small overridable hooks -----------------------------------------
    def _apply_rotary(self, x, start_index):
        return call_layer(self._rotary, x, start_index=start_index)

    def _update_cache(self, cache, key, value, cache_index):
        """Write ``key``/``value`` ``(B, Tq, Hkv, ·)`` at ``cache_index``; return
        ``(new_cache, key_cache, value_cache)``."""
        if isinstance(cache, (tuple, list)):
            key_cache, value_cache = cache
            if in_place_cache_writes():  # generate's private cache, eager torch
                start = int(cache_index)
                key_cache[:, start:start + key.shape[1]] = ops.cast(key, key_cache.dtype)
                value_cache[:, start:start + value.shape[1]] = ops.cast(value, value_cache.dtype)
                return cache, key_cache, value_cache
            key_cache = ops.slice_update(
                key_cache, (0, cache_index, 0, 0), ops.cast(key, key_cache.dtype))
            value_cache = ops.slice_update(
                value_cache, (0, cache_index, 0, 0), ops.cast(value, value_cache.dtype))
            return (key_cache, value_cache), key_cache, value_cache
        update = ops.cast(ops.stack([key, value], axis=1), cache.dtype)  # (B, 2, Tq, Hkv, D)
        cache = ops.slice_update(cache, (0, 0, cache_index, 0, 0), update)
        return cache, cache[:, 0], cache[:, 1]

    @staticmethod
    def _split_cache(cache):
        if isinstance(cache, (tuple, list)):
            return cache[0], cache[1]
        if len(_shape(cache)) != 5 or cache.shape[1] != 2:
            raise ValueError(
                "Expected a cache (key_cache, value_cache) of shapes (B, max_len, Hkv, D), "
                "or one stacked tensor (B, 2, max_len, Hkv, D). "
                f"Received: cache.shape={_shape(cache)}"
            )
        return cache[:, 0], cache[:, 1]

    # -- the call ---------------------------------------------------------
    def call(self, query, value, key=None, attention_mask=None, use_causal_mask=False,
             cache=None, cache_index=None, return_attention_scores=False, training=None):
        key = value if key is None else key
        read_only = cache is not None and cache_index is None  # precomputed (cross) cache
        q_len = query.shape[1]
        if cache is None:
            k_len = key.shape[1]
        else:
            k_len = self._split_cache(cache)[0].shape[1]  # Tk of a read-only cache, or max_len
        # Check the caller's mask before any work: (B|1, H|1, Tq|1, Tk) or ValueError.
        attention_mask = _as_bool(_to_4d(
            attention_mask, (query.shape[0], self.num_heads, q_len, k_len), "attention_mask"))
        key_padding = None if read_only else self._key_padding(value, key)  # (B, Tk_new)
        causal = bool(use_causal_mask) or self.sliding_window is not None

        q = call_layer(self._query_dense, query)  # (B, Tq, H, D)
        if read_only:
            k, v = self._split_cache(cache)  # (B, Tk, Hkv, D), (B, Tk, Hkv, Dv)
            new_cache = cache
        else:
            k = call_layer(self._key_dense, key)  # (B, Tk_new, Hkv, D)
            v = call_layer(self._value_dense, value)  # (B, Tk_new, Hkv, Dv)

        if cache is None or read_only:
            # Bottom-right alignment: query i sits at key position (Tk - Tq) + i.
            # (Lengths unknown while tracing, e.g. a retrace with relaxed shapes: read them.)
            start = (k_len - q_len if None not in (k_len, q_len)
                     else ops.shape(k)[1] - ops.shape(q)[1])
            if self.rotary:
                q = self._apply_rotary(q, start)
                if not read_only:  # cached keys were rotated when they were written
                    k = self._apply_rotary(k, 0)
            mask = None
            if self.sliding_window is not None:  # the window holds the causal part
                mask, causal = self._static_mask(q_len, k_len, True), False
            # A plain causal mask stays a flag: `_attend` picks the fused causal
            # kernel or the blocked path (it folds the flag in when Tq != Tk).
        else:
            # KV cache: the new tokens sit at [cache_index, cache_index + Tq).
            if self.rotary:
                q = self._apply_rotary(q, cache_index)
                k = self._apply_rotary(k, cache_index)
            new_cache, k, v = self._update_cache(cache, k, v, cache_index)  # (B, max_len, ...)
            start = cache_index
            q_pos = ops.arange(q_len, dtype="int32") + start
            k_pos = ops.arange(k_len, dtype="int32")
            mask = self._offset_mask(q_pos, k_pos, cache_index + q_len, causal)
            key_padding = self._cache_padding(key_padding, k_len, cache_index)
            causal = False  # folded into the offset mask

        mask = _and(mask, attention_mask)
        if key_padding is not None:
            mask = _and(mask, key_padding[:, None, None, :])  # (B, 1, 1, Tk)
        bias = None
        if self.alibi:  # query i at position start + i, key j at position j
            bias = _alibi_bias(self.num_heads, ops.arange(q_len, dtype="int32") + start,
                               ops.arange(k_len, dtype="int32"))
        result = _attend(
            q, k, v, mask=mask, bias=bias, causal=causal, scale=1.0 / math.sqrt(self.key_dim),
            dropout_rate=self.dropout, training=training,
            return_weights=return_attention_scores, seed=self.seed_generator,
        )
        output, weights = result if return_attention_scores else (result, None)
        output = call_layer(self._output_dense, output)  # (B, Tq, C)
        outputs = (output,) + ((weights,) if return_attention_scores else ())
        if cache is not None:
            outputs += (new_cache,)
        return outputs[0] if len(outputs) == 1 else outputs

    @staticmethod
    def _key_padding(value, key):
        """Key padding ``(B, Tk)`` from the Keras masks of ``value`` and ``key``."""
        padding = _as_bool(_keras_mask(value))
        if key is not value:
            padding = _and(padding, _as_bool(_keras_mask(key)))
        return padding

    def _static_mask(self, q_len, k_len, causal):
        """Causal (bottom-right) or sliding-window ``(1, 1, Tq, Tk)``, or None."""
        if self.sliding_window is not None:
            window = _masks.sliding_window_mask(q_len, k_len, self.sliding_window)
            return ops.reshape(window, (1, 1, q_len, k_len))
        return _causal_4d(q_len, k_len) if causal else None

    def _offset_mask(self, q_pos, k_pos, end, causal):
        """With a cache: ``(1, 1, Tq, max_len)``; keys at or after ``end`` are unwritten."""
        k = ops.expand_dims(k_pos, 0)  # (1, max_len)
        q = ops.expand_dims(q_pos, 1)  # (Tq, 1)
        mask = ops.less_equal(k, q) if causal else ops.broadcast_to(
            ops.less(k, end), (q_pos.shape[0], k_pos.shape[0]))
        if self.sliding_window is not None:
            mask = ops.logical_and(mask, ops.greater(k, q - self.sliding_window))
        return mask[None, None]

    @staticmethod
    def _cache_padding(key_padding, max_len, cache_index):
        """Place the new keys' padding ``(B, Tq)`` at ``cache_index`` in ``(B, max_len)``."""
        if key_padding is None:
            return None
        batch = ops.shape(key_padding)[0]
        full = ops.ones((batch, max_len), dtype="int32")
        full = ops.slice_update(full, (0, cache_index), ops.cast(key_padding, "int32"))
        return ops.not_equal(full, 0)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "num_kv_heads": self.num_kv_heads,
            "value_dim": self.value_dim,
            "dropout": self.dropout,
            "use_bias": self.use_bias,
            "rotary": self.rotary,
            "alibi": self.alibi,
            "sliding_window": self.sliding_window,
            "seed": self.seed,
        })
        return config


@keras.saving.register_keras_serializable(package="keras_decoder")
class SelfAttention(MultiHeadAttention):
    """Decoder self-attention: queries, keys and values from the same sequence.

    Key padding comes from the input's Keras mask (or ``padding_mask``), and
    the causal mask is added when ``causal=True``. Everything else is
    :class:`MultiHeadAttention` (same arguments, same weights, same cache).

    Call arguments:
        inputs: ``(B, T, C)``.
        padding_mask: optional bool ``(B, T)``, ``True`` = real token; defaults
            to the Keras mask of ``inputs``.
        attention_mask, cache, cache_index, return_attention_scores, training:
            as in :meth:`MultiHeadAttention.call`.

    Returns:
        ``(B, T, C)`` (plus weights ``(B, H, T, Tk)`` and the cache, as in
        :class:`MultiHeadAttention`).
    """

    def __init__(self, num_heads, key_dim, causal=True, **kwargs):
        super().__init__(num_heads, key_dim, **kwargs)
        self.causal = causal

    def build(self, inputs_shape):
        super().build(inputs_shape, inputs_shape)

    def call(self, inputs, padding_mask=None, attention_mask=None, cache=None, cache_index=None,
             return_attention_scores=False, training=None):
        if padding_mask is not None:
            pad = ops.expand_dims(_masks._padding(padding_mask, "padding_mask"), 1)  # (B, 1, T)
            if cache is not None and cache_index is not None:
                pad = MultiHeadAttention._cache_padding(pad[:, 0], self._cache_len(cache),
                                                        cache_index)[:, None]
            attention_mask = _masks.combine_masks(
                None if attention_mask is None else _to_4d(
                    attention_mask, (None, self.num_heads, None, None), "attention_mask"),
                ops.expand_dims(pad, 1),
            )
        return super().call(
            inputs, inputs, attention_mask=attention_mask, use_causal_mask=self.causal,
            cache=cache, cache_index=cache_index,
            return_attention_scores=return_attention_scores, training=training,
        )

    @staticmethod
    def _cache_len(cache):
        return (cache[0] if isinstance(cache, (tuple, list)) else cache[:, 0]).shape[1]

    def get_config(self):
        config = super().get_config()
        config["causal"] = self.causal
        return config


@keras.saving.register_keras_serializable(package="keras_decoder")
class CrossAttention(MultiHeadAttention):
    """Cross-attention, the decoder's "interaction" with the encoder.

    Queries come from the decoder ``(B, Tdec, C)``; keys and values from the
    encoder memory ``(B, Tenc, Cenc)``. Only encoder padding is masked (nothing
    is causal about the memory). The weights of the last call are kept in
    ``self.last_attention_weights`` ``(B, H, Tdec, Tenc)`` for plotting.

    Args:
        num_heads, key_dim, **kwargs: as :class:`MultiHeadAttention`.
        keep_attention_weights: keep the weights of each call. This takes the
            explicit (einsum) path; set ``False`` for the fused, faster one.

    Call arguments:
        query: decoder states ``(B, Tdec, C)``.
        memory: encoder output ``(B, Tenc, Cenc)``.
        encoder_padding_mask: optional bool ``(B, Tenc)``; defaults to the
            Keras mask of ``memory``.
        attention_mask: optional extra bool mask ``(B, Tdec, Tenc)``.
        cache: optional read-only ``(key, value)`` of the projected memory
            (``(B, Tenc, Hkv, D)``, ``(B, Tenc, Hkv, Dv)``), computed once per
            generation with :meth:`memory_cache`.
        return_attention_scores, training: as in :class:`MultiHeadAttention`.

    Returns:
        ``(B, Tdec, C)`` (plus the weights when ``return_attention_scores``,
        plus the cache when one is given).
    """

    def __init__(self, num_heads, key_dim, keep_attention_weights=True, **kwargs):
        super().__init__(num_heads, key_dim, **kwargs)
        self.keep_attention_weights = keep_attention_weights
        self.last_attention_weights = None

    def build(self, query_shape, memory_shape):
        super().build(query_shape, memory_shape)

    def memory_cache(self, memory):
        """The projected memory ``(key (B, Tenc, Hkv, D), value (B, Tenc, Hkv, Dv))``."""
        return self._key_dense(memory), self._value_dense(memory)

    def call(self, query, memory, encoder_padding_mask=None, attention_mask=None, cache=None,
             return_attention_scores=False, training=None):
        pad = encoder_padding_mask
        if pad is None:
            pad = _keras_mask(memory)
        if pad is not None:
            pad = _masks.cross_attention_mask(None, pad)  # (B, 1, Tenc)
            if attention_mask is not None:
                attention_mask = _to_4d(
                    attention_mask, (None, self.num_heads, None, None), "attention_mask")
            attention_mask = _masks.combine_masks(attention_mask, ops.expand_dims(pad, 1))
        want = return_attention_scores or self.keep_attention_weights
        result = super().call(
            query, memory, attention_mask=attention_mask, cache=cache,
            return_attention_scores=want, training=training,
        )
        if not want:
            return result
        result = tuple(result)
        self.last_attention_weights = result[1]
        if not return_attention_scores:
            result = (result[0],) + result[2:]
        return result[0] if len(result) == 1 else result

    def get_config(self):
        config = super().get_config()
        config["keep_attention_weights"] = self.keep_attention_weights
        return config


_MODES = ("sequential", "parallel", "joint")


@keras.saving.register_keras_serializable(package="keras_decoder")
class InteractingAttention(keras.layers.Layer):
    """The seed article's "interacting attention", in its three well-typed readings.

    The article writes ``Softmax(QKᵀ/√d)V + Softmax(QᵀKᵀ/√d)V``. ``QᵀKᵀ`` is not
    defined for ``Q (Tdec, d)`` and ``K (Tenc, d)`` unless ``Tdec == d``, so
    the formula needs a reading. With decoder states ``x (B, Tdec, C)`` and
    encoder memory ``m (B, Tenc, C)``, all three return ``(B, Tdec, C)``:

    * ``"sequential"``: ``h = x + SelfAttn(x)`` (causal), then
      ``CrossAttn(h, m)``. The standard Transformer decoder: the queries of
      cross-attention already know the decoder's past. Two attentions, one
      after the other; weights ``(B, H, Tdec, Tdec)`` then ``(B, H, Tdec, Tenc)``.
    * ``"parallel"``: ``SelfAttn(x) + CrossAttn(x, m)``. The article's sum,
      made well-typed: both terms read the same input and are ``(B, Tdec, C)``.
      Each softmax is normalised on its own, so the decoder's past and the
      memory each get a total weight of 1.
    * ``"joint"``: one attention of ``x`` over ``concat([m, x])``
      ``(B, Tenc + Tdec, C)`` with ``masks.joint_attention_mask`` (memory
      padding; decoder padding and causal). One softmax over both, so memory
      and past *compete* for a total weight of 1 (weights
      ``(B, H, Tdec, Tenc + Tdec)``). Memory and decoder share the key/value
      projections, so ``Cenc`` must equal ``C``.

    Args:
        num_heads: ``H``.
        key_dim: ``D``.
        mode: ``"sequential"``, ``"parallel"`` or ``"joint"``.
        num_kv_heads, value_dim, dropout, use_bias: as :class:`MultiHeadAttention`.
        **kwargs: ``Layer`` arguments.

    Call arguments:
        inputs: decoder states ``(B, Tdec, C)``.
        memory: encoder output ``(B, Tenc, Cenc)``.
        decoder_padding_mask: optional bool ``(B, Tdec)``; defaults to the
            Keras mask of ``inputs``.
        encoder_padding_mask: optional bool ``(B, Tenc)``; defaults to the
            Keras mask of ``memory``.
        training: Python bool.

    Returns:
        ``(B, Tdec, C)``. No KV cache: use the blocks of ``layers.py`` to generate.
    """

    def __init__(self, num_heads, key_dim, mode="sequential", num_kv_heads=None,
                 value_dim=None, dropout=0.0, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        if mode not in _MODES:
            raise ValueError(f"Expected mode in {_MODES}. Received: mode={mode!r}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.mode = mode
        self.num_kv_heads = num_kv_heads
        self.value_dim = value_dim
        self.dropout = dropout
        self.use_bias = use_bias
        self.supports_masking = True
        common = dict(num_heads=num_heads, key_dim=key_dim, num_kv_heads=num_kv_heads,
                      value_dim=value_dim, dropout=dropout, use_bias=use_bias,
                      dtype=self.dtype_policy)
        if mode == "joint":
            self.joint_attention = MultiHeadAttention(name="joint_attention", **common)
        else:
            self.self_attention = SelfAttention(causal=True, name="self_attention", **common)
            self.cross_attention = CrossAttention(keep_attention_weights=False,
                                                  name="cross_attention", **common)

    def build(self, inputs_shape, memory_shape):
        if self.mode == "joint":
            if inputs_shape[-1] != memory_shape[-1]:
                raise ValueError(
                    "Expected memory and decoder states of the same width for joint "
                    "attention (they share the key/value projections). Received: "
                    f"inputs.shape={tuple(inputs_shape)}, memory.shape={tuple(memory_shape)}"
                )
            joint = (inputs_shape[0], None, inputs_shape[-1])
            self.joint_attention.build(inputs_shape, joint)
        else:
            self.self_attention.build(inputs_shape)
            self.cross_attention.build(inputs_shape, memory_shape)
        self.built = True

    def call(self, inputs, memory, decoder_padding_mask=None, encoder_padding_mask=None,
             training=None):
        dec = _keras_mask(inputs) if decoder_padding_mask is None else decoder_padding_mask
        enc = _keras_mask(memory) if encoder_padding_mask is None else encoder_padding_mask
        if self.mode == "joint":
            return self._joint(inputs, memory, dec, enc, training)
        own = self.self_attention(inputs, padding_mask=dec, training=training)  # (B, Tdec, C)
        if self.mode == "sequential":
            inputs = ops.add(inputs, own)  # (B, Tdec, C): now knows the decoder's past
        cross = self.cross_attention(inputs, memory, encoder_padding_mask=enc,
                                     training=training)  # (B, Tdec, C)
        return cross if self.mode == "sequential" else ops.add(own, cross)

    def _joint(self, inputs, memory, dec, enc, training):
        batch = ops.shape(inputs)[0]
        if dec is None:
            dec = ops.ones((batch, inputs.shape[1]), dtype="bool")
        if enc is None:
            enc = ops.ones((batch, memory.shape[1]), dtype="bool")
        mask = _masks.joint_attention_mask(dec, enc, causal=True)  # (B, Tdec, Tenc + Tdec)
        both = ops.concatenate([memory, inputs], axis=1)  # (B, Tenc + Tdec, C)
        return self.joint_attention(inputs, both, attention_mask=mask, training=training)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_heads": self.num_heads,
            "key_dim": self.key_dim,
            "mode": self.mode,
            "num_kv_heads": self.num_kv_heads,
            "value_dim": self.value_dim,
            "dropout": self.dropout,
            "use_bias": self.use_bias,
        })
        return config
