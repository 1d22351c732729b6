"""Float64 / boolean NumPy references, written as directly as possible.

Loops where a loop says it most plainly: these are the definitions the library
is checked against, so they must be obviously right rather than fast.
"""

import numpy as np


# ---------------------------------------------------------------- masks
def padding_mask(ids, pad_id=0):
    return np.asarray(ids) != pad_id


def causal_mask(query_len, key_len=None):
    key_len = query_len if key_len is None else key_len
    m = np.zeros((query_len, key_len), bool)
    for i in range(query_len):
        for j in range(key_len):
            m[i, j] = j <= key_len - query_len + i
    return m


def top_left_causal_mask(query_len, key_len):
    """What ``is_causal=True`` does in keras.ops.dot_product_attention."""
    return np.tril(np.ones((query_len, key_len), bool))


def self_attention_mask(pad, causal=True):
    pad = np.asarray(pad, bool)
    b, t = pad.shape
    m = np.zeros((b, t, t), bool)
    for n in range(b):
        for i in range(t):
            for j in range(t):
                m[n, i, j] = pad[n, j] and (not causal or j <= i)
    return m


def cross_attention_mask(dec_pad, enc_pad):
    enc_pad = np.asarray(enc_pad, bool)
    tdec = np.asarray(dec_pad).shape[1]
    return np.repeat(enc_pad[:, None, :], tdec, axis=1)


def segment_mask(q_seg, k_seg=None):
    q_seg = np.asarray(q_seg)
    k_seg = q_seg if k_seg is None else np.asarray(k_seg)
    b, tq = q_seg.shape
    tk = k_seg.shape[1]
    m = np.zeros((b, tq, tk), bool)
    for n in range(b):
        for i in range(tq):
            for j in range(tk):
                m[n, i, j] = q_seg[n, i] == k_seg[n, j] and q_seg[n, i] != 0
    return m


def sliding_window_mask(query_len, key_len, window):
    m = np.zeros((query_len, key_len), bool)
    for i in range(query_len):
        p = key_len - query_len + i
        for j in range(key_len):
            m[i, j] = p - window < j <= p
    return m


def prefix_lm_mask(prefix_lengths, seq_len):
    b = len(prefix_lengths)
    m = np.zeros((b, seq_len, seq_len), bool)
    for n in range(b):
        for i in range(seq_len):
            for j in range(seq_len):
                m[n, i, j] = j <= i or j < prefix_lengths[n]
    return m


def joint_attention_mask(dec_pad, enc_pad, causal=True):
    return np.concatenate(
        [cross_attention_mask(dec_pad, enc_pad), self_attention_mask(dec_pad, causal)], axis=2
    )


# ---------------------------------------------------------------- inputs
def shift_right(ids, start_id, pad_id=0):
    ids = np.asarray(ids)
    out = np.empty_like(ids)
    for n, row in enumerate(ids):
        if np.all(row == pad_id):
            out[n] = pad_id
        else:
            out[n] = np.concatenate([[start_id], row[:-1]])
    return out


def sinusoidal(positions, dim, max_wavelength=10000):
    """``PE[p, 2i] = sin(p / w^(2i/D))``, ``PE[p, 2i+1] = cos(p / w^(2i/D))``."""
    positions = np.asarray(positions, np.float64)
    pe = np.zeros(positions.shape + (dim,))
    for k in range(dim):
        i = k // 2
        angle = positions / max_wavelength ** (2 * i / dim)
        pe[..., k] = np.sin(angle) if k % 2 == 0 else np.cos(angle)
    return pe


def rotary(x, positions, max_wavelength=10000):
    """RoPE on ``(B, T, H, D)``: rotate pairs ``(x[i], x[i + D/2])`` by ``p * w^(-2i/D)``."""
    x = np.asarray(x, np.float64)
    positions = np.broadcast_to(np.asarray(positions, np.float64), x.shape[:2])
    d = x.shape[-1]
    out = np.empty_like(x)
    for i in range(d // 2):
        theta = positions * max_wavelength ** (-2 * i / d)  # (B, T)
        c, s = np.cos(theta)[..., None], np.sin(theta)[..., None]  # (B, T, 1)
        a, b = x[..., i], x[..., i + d // 2]  # (B, T, H)
        out[..., i] = a * c - b * s
        out[..., i + d // 2] = b * c + a * s
    return out


# ---------------------------------------------------------------- attention
def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def attention(q, k, v, mask=None):
    """Float64 attention on ``(B, T, H, D)``; fully masked rows give 0."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        m = np.asarray(mask, bool)
        while m.ndim < 4:
            m = m[None] if m.ndim == 2 else m[:, None]
        m = np.broadcast_to(m, scores.shape)
        scores = np.where(m, scores, -np.inf)
        rows = m.any(-1, keepdims=True)
        scores = np.where(rows, scores, 0.0)
        w = softmax(scores) * rows
    else:
        w = softmax(scores)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


# ============================================================================
# Attention with GQA, bias and projections (used by tests/test_attention.py).
# Appended as its own section; nothing above depends on it.
# ============================================================================
def _mask_4d(mask, dtype=bool):
    m = np.asarray(mask, dtype)
    if m.ndim == 2:
        return m[None, None]
    if m.ndim == 3:
        return m[:, None]
    return m


def gqa_attention(q, k, v, mask=None, bias=None, scale=None):
    """Float64 attention, ``q (B, Tq, H, D)``, ``k (B, Tk, Hkv, D)``, ``v (B, Tk, Hkv, Dv)``.

    Key/value head ``h // (H // Hkv)`` serves query head ``h``. ``mask`` and
    ``bias`` broadcast to ``(B, H, Tq, Tk)`` (2-D and 3-D forms as in Keras).
    Returns ``(output (B, Tq, H, Dv), weights (B, H, Tq, Tk))``; a row with no
    visible key has zero weights and a zero output.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((b, tq, h, v.shape[-1]))
    weights = np.zeros((b, h, tq, tk))
    m = None if mask is None else np.broadcast_to(_mask_4d(mask), (b, h, tq, tk))
    bb = None if bias is None else np.broadcast_to(_mask_4d(bias, np.float64),
                                                   (b, h, tq, tk))
    for n in range(b):
        for head in range(h):
            kv = head // (h // hkv)
            for i in range(tq):
                s = scale * (k[n, :, kv] @ q[n, i, head])  # (Tk,)
                if bb is not None:
                    s = s + bb[n, head, i]
                keep = np.ones(tk, bool) if m is None else m[n, head, i]
                if not keep.any():
                    continue
                e = np.where(keep, np.exp(s - s[keep].max()), 0.0)
                w = e / e.sum()
                weights[n, head, i] = w
                out[n, i, head] = w @ v[n, :, kv]
    return out, weights


def alibi_slopes(num_heads):
    """Press et al.: for ``n`` a power of two, ``2^(-8/n), 2^(-16/n), ...``; else
    the ``2^floor(log2 n)`` slopes then every other slope of ``2 * that``."""
    def geometric(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    p = 2 ** int(np.floor(np.log2(num_heads)))
    if p == num_heads:
        return geometric(num_heads)
    return geometric(p) + geometric(2 * p)[::2][: num_heads - p]


def alibi_bias(num_heads, query_positions, key_positions):
    """``-slope_h * |i - j|``: ``(1, H, Tq, Tk)``."""
    qp = np.asarray(query_positions, np.float64)[:, None]
    kp = np.asarray(key_positions, np.float64)[None, :]
    slopes = np.asarray(alibi_slopes(num_heads))[:, None, None]
    return (-slopes * np.abs(qp - kp))[None]


def project_heads(x, kernel, bias=None):
    """``(B, T, C) x (C, H, D) -> (B, T, H, D)``."""
    y = np.einsum("btc,chd->bthd", np.asarray(x, np.float64), np.asarray(kernel, np.float64))
    return y if bias is None else y + np.asarray(bias, np.float64)


def multi_head_attention(query, value, weights, key=None, mask=None, bias=None,
                         query_positions=None, key_positions=None, rotary_wavelength=None):
    """Float64 multi-head attention with the Keras weight layout.

    ``weights``: dict with ``query``, ``key``, ``value``, ``attention_output``,
    each ``(kernel, bias_or_None)``: kernels ``(C, H, D)``, ``(Ckv, Hkv, D)``,
    ``(Ckv, Hkv, Dv)``, ``(H, Dv, C)``. With ``rotary_wavelength``, RoPE
    rotates queries and keys at ``query_positions`` / ``key_positions``.
    Returns ``(output (B, Tq, C), weights (B, H, Tq, Tk))``.
    """
    key = value if key is None else key
    q = project_heads(query, *weights["query"])
    k = project_heads(key, *weights["key"])
    v = project_heads(value, *weights["value"])
    if rotary_wavelength is not None:
        q = rotary(q, np.asarray(query_positions)[None], rotary_wavelength)
        k = rotary(k, np.asarray(key_positions)[None], rotary_wavelength)
    out, w = gqa_attention(q, k, v, mask=mask, bias=bias)
    kernel, b = weights["attention_output"]
    y = np.einsum("bthd,hdc->btc", out, np.asarray(kernel, np.float64))
    return (y if b is None else y + np.asarray(b, np.float64)), w
