"""Attention masks, built one concept at a time.

One convention everywhere (see CONVENTIONS §1): a mask is **boolean** and
``True`` means **"this query may attend to this key"**. Masks stay boolean until
the very last moment; :func:`to_additive` turns one into a bias inside attention.

Shapes used in the docstrings:

* ``B``: batch size,
* ``T``: sequence length (``Tq`` queries, ``Tk`` keys),
* ``Tdec`` / ``Tenc``: decoder and encoder lengths.

Every function accepts anything ``keras.ops.convert_to_tensor`` accepts (NumPy
arrays, lists, backend tensors), returns a backend tensor, and traces under
``jit_compile=True``: lengths are Python integers (static shapes), and checks
that need the *values* of a tensor (a prefix longer than the sequence) run only
when the values are known, that is, eagerly.
"""

import numpy as np
from keras import KerasTensor
from keras import backend
from keras import ops

__all__ = [
    "padding_mask",
    "causal_mask",
    "self_attention_mask",
    "cross_attention_mask",
    "combine_masks",
    "segment_mask",
    "sliding_window_mask",
    "prefix_lm_mask",
    "joint_attention_mask",
    "to_additive",
]


# ---------------------------------------------------------------------------
# Private helpers: conversion and checks that name what was expected.
# ---------------------------------------------------------------------------
def _tensor(x, name):
    if x is None:
        raise ValueError(f"Expected a tensor for `{name}`. Received: {name}=None")
    if isinstance(x, KerasTensor):
        return x
    return ops.convert_to_tensor(x)


def _shape(x):
    return tuple(x.shape)


def _dtype(x):
    return backend.standardize_dtype(x.dtype)


def _check_rank(x, rank, name, meaning):
    if len(_shape(x)) != rank:
        raise ValueError(
            f"Expected `{name}` of rank {rank}, shape {meaning}. "
            f"Received: {name}.shape={_shape(x)}"
        )


def _check_int_ids(x, name):
    dtype = _dtype(x)
    if "int" not in dtype:
        raise ValueError(
            f"Expected integer ids in `{name}` (int32 or int64). "
            f"Received: {name}.dtype={dtype}"
        )


def _as_bool(x):
    return x if _dtype(x) == "bool" else ops.not_equal(x, 0)


def _same(a, b):
    """Static dimensions agree, treating unknown (None) as agreeing."""
    return a is None or b is None or a == b


def _check_length(value, name, minimum=0):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"Expected `{name}` to be a Python int (a static length). "
            f"Received: {name}={value!r} of type {type(value).__name__}"
        )
    if value < minimum:
        raise ValueError(f"Expected `{name}` >= {minimum}. Received: {name}={value}")
    return int(value)


def _concrete(x):
    """Return ``x`` as a NumPy array when its values are known, else ``None``.

    Values are known eagerly; they are not while tracing (a TensorFlow graph, a
    JAX tracer, a functional-API KerasTensor). Value checks run only eagerly.
    """
    if isinstance(x, KerasTensor):
        return None
    try:
        return ops.convert_to_numpy(x)
    except Exception:  # tracing: the values are not known yet
        return None


def _padding(mask, name):
    mask = _tensor(mask, name)
    _check_rank(mask, 2, name, "(batch, seq_len)")
    return _as_bool(mask)


# ---------------------------------------------------------------------------
# Padding and causality.
# ---------------------------------------------------------------------------
def padding_mask(token_ids, pad_id=0):
    """Which tokens are real: ``True`` for real tokens, ``False`` for padding.

    Args:
        token_ids: int tensor ``(B, T)``.
        pad_id: the id that marks padding (default 0, as in
            ``keras.layers.Embedding(mask_zero=True)``).

    Returns:
        bool ``(B, T)``. Used as a *key* mask: a padded key is never attended.
        Padded *queries* are computed and then dropped by the loss mask.
    """
    token_ids = _tensor(token_ids, "token_ids")
    _check_rank(token_ids, 2, "token_ids", "(batch, seq_len)")
    _check_int_ids(token_ids, "token_ids")
    return ops.not_equal(token_ids, ops.cast(pad_id, token_ids.dtype))


def _band(query_len, key_len, window=None):
    """Bottom-right aligned band: query ``i`` is at position ``key_len - query_len + i``."""
    offset = key_len - query_len
    q = ops.expand_dims(ops.arange(query_len, dtype="int32") + offset, 1)  # (Tq, 1)
    k = ops.expand_dims(ops.arange(key_len, dtype="int32"), 0)  # (1, Tk)
    mask = ops.less_equal(k, q)  # (Tq, Tk)
    if window is not None:
        mask = ops.logical_and(mask, ops.greater(k, q - window))
    return mask


def causal_mask(query_len, key_len=None):
    """The causal (look-ahead, the article's 时间掩码) mask, bottom-right aligned.

    Query ``i`` sees key ``j`` iff ``j <= key_len - query_len + i``: the *last*
    query is aligned with the *last* key. With ``query_len == key_len`` this is
    the usual lower triangle. With ``query_len < key_len`` it is what KV-cached
    decoding needs: the ``query_len`` new tokens come after ``key_len - query_len``
    cached ones. (``keras.ops.dot_product_attention(is_causal=True)`` aligns to
    the top-left instead, which is wrong for a cache.)

    Args:
        query_len: int, ``Tq``.
        key_len: int, ``Tk >= Tq``; defaults to ``query_len``.

    Returns:
        bool ``(Tq, Tk)``.
    """
    query_len = _check_length(query_len, "query_len")
    key_len = query_len if key_len is None else _check_length(key_len, "key_len")
    if key_len < query_len:
        raise ValueError(
            "Expected key_len >= query_len: with bottom-right alignment the "
            "queries are the last query_len positions of the keys. "
            f"Received: query_len={query_len}, key_len={key_len}"
        )
    return _band(query_len, key_len)


def self_attention_mask(padding_mask, causal=True):
    """Decoder self-attention mask: key padding AND (optionally) causal.

    Args:
        padding_mask: bool ``(B, T)``, ``True`` for real tokens.
        causal: whether to add the causal mask.

    Returns:
        bool ``(B, T, T)``; ``[b, i, j]`` is ``True`` iff key ``j`` is real (and
        ``j <= i`` when causal). A padded query row keeps its causal keys, so it
        is never fully masked as long as the row has one real token before it.
    """
    keys = _padding(padding_mask, "padding_mask")
    length = _shape(keys)[1]
    mask = _rows_of(keys, keys)  # (B, T, T): key padding, repeated for each query
    if causal:
        if length is None:
            raise ValueError(
                "Expected a static sequence length for the causal mask. "
                f"Received: padding_mask.shape={_shape(keys)}"
            )
        mask = ops.logical_and(mask, ops.expand_dims(causal_mask(length), 0))
    return mask


def _rows_of(queries, keys):
    """``(B, Tq, Tk)``: the key mask ``(B, Tk)`` repeated for each of ``Tq`` queries.

    Built by broadcasting, not ``broadcast_to``, so that an unknown (symbolic)
    batch size or length works in the functional API.
    """
    every_query = ops.expand_dims(ops.ones_like(queries, dtype="bool"), 2)  # (B, Tq, 1)
    return ops.logical_and(every_query, ops.expand_dims(keys, 1))  # (B, Tq, Tk)


def cross_attention_mask(decoder_padding_mask, encoder_padding_mask):
    """The cross-attention (交互, "interaction") mask: decoder queries, encoder keys.

    Only encoder padding is masked: every decoder position may look at every
    real encoder token; there is nothing causal about the encoder memory.

    Args:
        decoder_padding_mask: bool ``(B, Tdec)`` or ``None``. Used only for its
            shape. With ``None`` the result is ``(B, 1, Tenc)``, which
            broadcasts over any number of decoder positions.
        encoder_padding_mask: bool ``(B, Tenc)``.

    Returns:
        bool ``(B, Tdec, Tenc)``.
    """
    enc = _padding(encoder_padding_mask, "encoder_padding_mask")
    mask = ops.expand_dims(enc, 1)  # (B, 1, Tenc)
    if decoder_padding_mask is None:
        return mask
    dec = _padding(decoder_padding_mask, "decoder_padding_mask")
    if not _same(_shape(dec)[0], _shape(enc)[0]):
        raise ValueError(
            "Expected decoder and encoder padding masks with the same batch size. "
            f"Received: decoder_padding_mask.shape={_shape(dec)}, "
            f"encoder_padding_mask.shape={_shape(enc)}"
        )
    return _rows_of(dec, enc)


def combine_masks(*masks):
    """Broadcasting logical AND of boolean masks; ``None`` entries are ignored.

    Shapes must broadcast under NumPy rules, e.g. ``(Tq, Tk)`` with
    ``(B, 1, Tk)`` gives ``(B, Tq, Tk)``. Shapes that do not broadcast raise
    instead of being reshaped behind your back.

    Returns:
        The combined bool mask, or ``None`` if every entry is ``None``.
    """
    present = [_as_bool(_tensor(m, "mask")) for m in masks if m is not None]
    if not present:
        return None
    shapes = [_shape(m) for m in present]
    try:
        # Unknown (None) dims are treated as 1 here: they broadcast at run time.
        np.broadcast_shapes(*[tuple(1 if d is None else d for d in s) for s in shapes])
    except ValueError:
        raise ValueError(
            "Expected masks whose shapes broadcast together, e.g. (Tq, Tk) with "
            f"(B, 1, Tk). Received: shapes {shapes}"
        ) from None
    result = present[0]
    for m in present[1:]:
        result = ops.logical_and(result, m)
    return result


# ---------------------------------------------------------------------------
# Patterns for packed sequences, long contexts and conditioning.
# ---------------------------------------------------------------------------
def segment_mask(query_segment_ids, key_segment_ids=None):
    """Document (segment) mask for packed sequences.

    Several documents share one row; each token carries its document's segment
    id (1, 2, ...). A query attends only to keys of its own segment. Segment id
    0 marks padding: it attends to nothing and nothing attends to it. Combine
    with :func:`causal_mask` for a packed decoder.

    Args:
        query_segment_ids: int ``(B, Tq)``.
        key_segment_ids: int ``(B, Tk)``; defaults to ``query_segment_ids``.

    Returns:
        bool ``(B, Tq, Tk)``.
    """
    q = _tensor(query_segment_ids, "query_segment_ids")
    _check_rank(q, 2, "query_segment_ids", "(batch, query_len)")
    _check_int_ids(q, "query_segment_ids")
    if key_segment_ids is None:
        k = q
    else:
        k = _tensor(key_segment_ids, "key_segment_ids")
        _check_rank(k, 2, "key_segment_ids", "(batch, key_len)")
        _check_int_ids(k, "key_segment_ids")
        if not _same(_shape(q)[0], _shape(k)[0]):
            raise ValueError(
                "Expected query and key segment ids with the same batch size. "
                f"Received: query_segment_ids.shape={_shape(q)}, "
                f"key_segment_ids.shape={_shape(k)}"
            )
        k = ops.cast(k, q.dtype)
    q3 = ops.expand_dims(q, 2)  # (B, Tq, 1)
    k3 = ops.expand_dims(k, 1)  # (B, 1, Tk)
    same = ops.equal(q3, k3)
    real = ops.logical_and(ops.not_equal(q3, 0), ops.not_equal(k3, 0))
    return ops.logical_and(same, real)


def sliding_window_mask(query_len, key_len=None, window=None):
    """Causal band of width ``window`` (local / sliding-window attention).

    Bottom-right aligned like :func:`causal_mask`: query ``i`` sits at absolute
    position ``p = key_len - query_len + i`` and sees keys ``p - window < j <= p``,
    that is, itself and the ``window - 1`` keys before it.

    Args:
        query_len: int ``Tq``.
        key_len: int ``Tk >= Tq``; defaults to ``query_len``.
        window: int ``>= 1`` (required).

    Returns:
        bool ``(Tq, Tk)``.
    """
    query_len = _check_length(query_len, "query_len")
    key_len = query_len if key_len is None else _check_length(key_len, "key_len")
    if window is None:
        raise ValueError("Expected `window`, an int >= 1. Received: window=None")
    window = _check_length(window, "window", minimum=1)
    if key_len < query_len:
        raise ValueError(
            "Expected key_len >= query_len (bottom-right alignment). "
            f"Received: query_len={query_len}, key_len={key_len}"
        )
    return _band(query_len, key_len, window)


def prefix_lm_mask(prefix_lengths, seq_len):
    """Prefix-LM mask: bidirectional inside each row's prefix, causal after it.

    Query ``i`` of row ``b`` sees key ``j`` iff ``j <= i`` or
    ``j < prefix_lengths[b]``. Used with
    :class:`keras_decoder.inputs.PrefixConditioning` and for T5-style prefix LMs.

    Args:
        prefix_lengths: int ``(B,)``, each in ``[0, seq_len]``.
        seq_len: int ``T``.

    Returns:
        bool ``(B, T, T)``.
    """
    seq_len = _check_length(seq_len, "seq_len")
    lengths = _tensor(prefix_lengths, "prefix_lengths")
    _check_rank(lengths, 1, "prefix_lengths", "(batch,)")
    _check_int_ids(lengths, "prefix_lengths")
    values = _concrete(lengths)
    if values is not None and values.size and (values.max() > seq_len or values.min() < 0):
        raise ValueError(
            f"Expected every prefix length in [0, seq_len={seq_len}]. "
            f"Received: prefix_lengths={values.tolist()}"
        )
    k = ops.arange(seq_len, dtype="int32")
    in_prefix = ops.less(
        ops.reshape(k, (1, 1, seq_len)),
        ops.reshape(ops.cast(lengths, "int32"), (-1, 1, 1)),
    )  # (B, 1, T)
    return ops.logical_or(ops.expand_dims(causal_mask(seq_len), 0), in_prefix)


def joint_attention_mask(decoder_padding_mask, encoder_padding_mask, causal=True):
    """Mask for one attention over the concatenation ``[encoder memory; decoder]``.

    The "joint" reading of the article's interacting attention: decoder queries
    attend to keys ``concat([memory, decoder_states], axis=1)``. The first
    ``Tenc`` key columns are the encoder memory (masked only by encoder
    padding); the last ``Tdec`` columns are the decoder itself (key padding and,
    optionally, causal).

    Args:
        decoder_padding_mask: bool ``(B, Tdec)``.
        encoder_padding_mask: bool ``(B, Tenc)``.
        causal: whether the decoder part is causal.

    Returns:
        bool ``(B, Tdec, Tenc + Tdec)``.
    """
    dec = _padding(decoder_padding_mask, "decoder_padding_mask")
    memory = cross_attention_mask(dec, encoder_padding_mask)  # (B, Tdec, Tenc)
    own = self_attention_mask(dec, causal=causal)  # (B, Tdec, Tdec)
    return ops.concatenate([memory, own], axis=2)


# ---------------------------------------------------------------------------
# From boolean to additive, at the last moment.
# ---------------------------------------------------------------------------
_FLOAT_MAX = {
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": float(np.finfo(np.float32).max),
    "float64": float(np.finfo(np.float64).max),
}


def large_negative(dtype="float32"):
    """A large negative number that is safe in ``dtype``: a quarter of ``finfo.min``.

    A quarter, not all of it, so that adding it to scores of ordinary size, or
    adding two such biases (a mask and another mask), cannot overflow to
    ``-inf``, which would turn a fully masked softmax row into NaN. ``-1e9`` is
    *not* safe: it overflows float16 (whose largest finite value is 65504).
    """
    dtype = backend.standardize_dtype(dtype)
    if dtype not in _FLOAT_MAX:
        raise ValueError(
            f"Expected a float dtype in {sorted(_FLOAT_MAX)}. Received: dtype={dtype}"
        )
    return -0.25 * _FLOAT_MAX[dtype]


def to_additive(mask, dtype="float32"):
    """Turn a boolean mask into an additive bias for attention scores.

    Returns ``0`` where the mask is ``True`` and :func:`large_negative` for
    ``dtype`` where it is ``False``, with the mask's shape and dtype ``dtype``.
    """
    mask = _as_bool(_tensor(mask, "mask"))
    large_negative(dtype)  # validates the requested dtype
    zero = ops.zeros((), dtype=backend.standardize_dtype(dtype))
    # The backend may give another dtype than requested (JAX without x64 turns
    # float64 into float32): take the constant from the dtype actually made.
    neg = ops.full((), large_negative(zero.dtype), dtype=zero.dtype)
    return ops.where(mask, zero, neg)
