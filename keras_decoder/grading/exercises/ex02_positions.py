"""Exercise set 02: positions.

================================= ============================================ ======
function                          returns                                      points
================================= ============================================ ======
``sinusoidal_position_encoding``  float ``(length, dim)``, interleaved sin/cos  2
``rotary_embedding``              float ``(B, T, H, D)``, RoPE at start_index   3
``alibi_bias``                    float ``(H, Tq, Tk)``, bottom-right aligned   2
================================= ============================================ ======

NumPy only: the grader never imports Keras.
"""

import numpy as np

from ..spec import Case, ExerciseSet, Mistake, Output, Question
from ._common import label as _label, randint as _int

MAX_WAVELENGTH = 10000.0


# ---------------------------------------------------------------------------
# sinusoidal_position_encoding
# ---------------------------------------------------------------------------
def _sinusoid(positions, dim, pair_exponent=True, swap=False, layout="interleaved"):
    """``(T, dim)`` encodings of ``positions`` with switches for common mistakes."""
    positions = np.asarray(positions, np.float64)[:, None]
    if pair_exponent:
        exponent = 2.0 * np.arange(dim // 2) / dim  # pair i: 2i / dim
    else:
        exponent = np.arange(0, dim, 2) / dim * 0.5  # the channel index i / dim, not 2i / dim
    angles = positions / MAX_WAVELENGTH ** exponent[None, :]  # (T, dim / 2)
    first, second = (np.cos(angles), np.sin(angles)) if swap else (np.sin(angles), np.cos(angles))
    if layout == "concatenated":
        return np.concatenate([first, second], axis=1)
    return np.stack([first, second], axis=-1).reshape(len(positions), dim)


def sinusoidal_position_encoding(length, dim):
    """Reference: ``PE[p, 2i] = sin(p / 10000^(2i/dim))``, ``PE[p, 2i+1] = cos(...)``; ``(length, dim)``."""
    return _sinusoid(np.arange(length), dim)


def _sinusoid_cases(rng):
    pairs = [(_int(rng, 5, 9), 8), (_int(rng, 30, 60), _int(rng, 2, 4) * 2), (_int(rng, 3, 6), 16)]
    return [Case((length, dim), {}, _label(length=length, dim=dim)) for length, dim in pairs]


SINUSOIDAL_POSITION_ENCODING = Question(
    name="sinusoidal_position_encoding",
    signature="sinusoidal_position_encoding(length, dim)",
    points=2,
    summary="float (length, dim): PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same).",
    reference=sinusoidal_position_encoding,
    cases=_sinusoid_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "concatenated_layout",
            "The sines fill the first half of the channels and the cosines the second half "
            "(the tensor2tensor layout). Here they are interleaved: channel 2i is a sine and "
            "channel 2i + 1 the cosine of the same angle.",
            impl=lambda length, dim: _sinusoid(np.arange(length), dim, layout="concatenated"),
        ),
        Mistake(
            "sin_cos_swapped",
            "Sine and cosine are swapped: even channels are sines, odd channels cosines.",
            impl=lambda length, dim: _sinusoid(np.arange(length), dim, swap=True),
        ),
        Mistake(
            "exponent_uses_channel_index",
            "The frequencies are off: pair i (channels 2i and 2i + 1) uses 10000^(2i / dim). "
            "Using the pair index i alone, 10000^(i / dim), makes every wave too fast.",
            impl=lambda length, dim: _sinusoid(np.arange(length), dim, pair_exponent=False),
        ),
        Mistake(
            "positions_from_one",
            "Positions start at 1. The first token is at position 0, whose encoding is "
            "[0, 1, 0, 1, ...].",
            impl=lambda length, dim: _sinusoid(np.arange(1, length + 1), dim),
        ),
    ),
    hints=(
        "Make a (length, 1) column of positions and a (1, dim / 2) row of inverse frequencies "
        "10000^(-2i/dim); their product is the (length, dim / 2) table of angles.",
        "Interleave: `ops.stack([ops.sin(angles), ops.cos(angles)], axis=-1)` has shape "
        "(length, dim / 2, 2); reshape it to (length, dim).",
        "`inv = 10000.0 ** (-ops.arange(0, dim, 2, dtype='float32') / dim)`; "
        "`angles = ops.arange(length, dtype='float32')[:, None] * inv[None, :]`; then stack and reshape.",
    ),
)


# ---------------------------------------------------------------------------
# rotary_embedding
# ---------------------------------------------------------------------------
def _rope(x, start_index=0, pairing="half", sign=1.0, exponent_scale=2.0):
    x = np.asarray(x, np.float64)
    _, length, _, dim = x.shape
    positions = np.arange(length) + start_index
    theta = MAX_WAVELENGTH ** (-exponent_scale * np.arange(dim // 2) / dim)
    angles = sign * positions[:, None] * theta[None, :]  # (T, D/2)
    cos, sin = np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]
    if pairing == "half":
        x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # neighbours (2i, 2i + 1)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    return out


def rotary_embedding(x, start_index=0):
    """Reference: rotate channel pairs ``(i, i + D/2)`` of ``x`` ``(B, T, H, D)`` by ``p * 10000^(-2i/D)``."""
    return _rope(x, start_index)


def _rope_cases(rng):
    cases = []
    x = rng.standard_normal((2, _int(rng, 4, 6), 2, 8)).astype(np.float32)
    cases.append(Case((x,), {}, f"x of shape {x.shape}, start_index omitted"))
    x = rng.standard_normal((1, _int(rng, 2, 4), 3, 6)).astype(np.float32)
    start = _int(rng, 3, 20)
    cases.append(Case((x,), {"start_index": start}, f"x of shape {x.shape}, start_index={start}"))
    x = rng.standard_normal((2, _int(rng, 3, 5), 1, 4)).astype(np.float32)
    cases.append(Case((x, 0), {}, f"x of shape {x.shape}, start_index=0"))
    return cases


ROTARY_EMBEDDING = Question(
    name="rotary_embedding",
    signature="rotary_embedding(x, start_index=0)",
    points=3,
    summary="float (B, T, H, D): x rotated by RoPE at positions start_index, start_index + 1, ...",
    reference=rotary_embedding,
    cases=_rope_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "interleaved_pairs",
            "You rotate neighbouring channels (2i, 2i + 1), as in the RoPE paper and GPT-J. "
            "This exercise (like KerasHub, Hugging Face and the lesson) pairs channel i with "
            "channel i + D/2: split x into two halves.",
            impl=lambda x, start_index=0: _rope(x, start_index, pairing="interleaved"),
        ),
        Mistake(
            "ignores_start_index",
            "The positions always start at 0. With a KV cache the new tokens sit at "
            "start_index, start_index + 1, ...: add start_index to the positions.",
            impl=lambda x, start_index=0: _rope(x, 0),
            applies=lambda case: case.kwargs.get("start_index", case.args[1] if len(case.args) > 1 else 0) != 0,
        ),
        Mistake(
            "rotation_reversed",
            "The rotation goes the wrong way (the sine terms have the opposite sign): "
            "out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin.",
            impl=lambda x, start_index=0: _rope(x, start_index, sign=-1.0),
        ),
        Mistake(
            "wrong_frequencies",
            "The frequencies are off: pair i turns by 10000^(-2i/D) per position, not "
            "10000^(-i/D).",
            impl=lambda x, start_index=0: _rope(x, start_index, exponent_scale=1.0),
        ),
    ),
    hints=(
        "Each token's vector is cut into two halves, x1 and x2; channel i of x1 and channel i "
        "of x2 form a 2-D point that is rotated by the angle position * theta_i.",
        "angles = (arange(T) + start_index)[:, None] * theta[None, :], with theta_i = "
        "10000^(-2i/D) for i < D/2; reshape cos and sin to (1, T, 1, D/2) to broadcast.",
        "`x1, x2 = x[..., :D//2], x[..., D//2:]`; "
        "`return ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)`.",
    ),
)


# ---------------------------------------------------------------------------
# alibi_bias
# ---------------------------------------------------------------------------
def _slopes(num_heads, first=1):
    return 2.0 ** (-8.0 * np.arange(first, first + num_heads) / num_heads)


def _alibi(num_heads, query_len, key_len, slopes=None, aligned=True, sign=-1.0):
    slopes = _slopes(num_heads) if slopes is None else slopes
    offset = key_len - query_len if aligned else 0
    q = np.arange(query_len)[:, None] + offset
    distance = np.abs(q - np.arange(key_len)[None, :])  # (Tq, Tk)
    return sign * slopes[:, None, None] * distance[None]


def alibi_bias(num_heads, query_len, key_len):
    """Reference: ``-m_h * |key_len - query_len + i - j|``, ``m_h = 2^(-8 (h + 1) / H)``; ``(H, Tq, Tk)``."""
    return _alibi(num_heads, query_len, key_len)


def _alibi_cases(rng):
    triples = [(4, t := _int(rng, 3, 5), t), (8, 2, _int(rng, 4, 6)), (2, 1, _int(rng, 3, 5))]
    return [Case(tr, {}, _label(num_heads=tr[0], query_len=tr[1], key_len=tr[2])) for tr in triples]


ALIBI_BIAS = Question(
    name="alibi_bias",
    signature="alibi_bias(num_heads, query_len, key_len)",
    points=2,
    summary="float (H, Tq, Tk): -m_h * distance, m_h = 2^(-8(h+1)/H), queries aligned to the last keys.",
    reference=alibi_bias,
    cases=_alibi_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "slopes_start_at_one",
            "The first head's slope is 1: you used h = 0, 1, ... The slopes are 2^(-8h/H) for "
            "h = 1 .. H, so the first is 2^(-8/H).",
            impl=lambda num_heads, query_len, key_len: _alibi(num_heads, query_len, key_len, _slopes(num_heads, 0)),
        ),
        Mistake(
            "positive_bias",
            "The bias is positive: distant keys would be *favoured*. ALiBi subtracts the "
            "penalty: -m_h * distance.",
            impl=lambda num_heads, query_len, key_len: _alibi(num_heads, query_len, key_len, sign=1.0),
        ),
        Mistake(
            "top_left_alignment",
            "Query i is placed at position i. With query_len < key_len (a KV cache) the queries "
            "are the last positions: query i sits at key_len - query_len + i.",
            impl=lambda num_heads, query_len, key_len: _alibi(num_heads, query_len, key_len, aligned=False),
        ),
        Mistake(
            "slopes_reversed",
            "The slopes are in reverse order: the first head must have the steepest slope, "
            "2^(-8/H), and the last the shallowest, 2^(-8).",
            impl=lambda num_heads, query_len, key_len: _alibi(num_heads, query_len, key_len, _slopes(num_heads)[::-1]),
        ),
    ),
    hints=(
        "Two pieces: one slope per head, and one distance per (query, key) pair; the bias is "
        "minus their product.",
        "slopes = 2 ** (-8 * arange(1, H + 1) / H); query i sits at key_len - query_len + i, so "
        "distance[i, j] = |key_len - query_len + i - j|.",
        "`return -slopes[:, None, None] * distance[None, :, :]` with both as float arrays.",
    ),
)


EXERCISE_SET = ExerciseSet(
    id="02_positions",
    title="Positions",
    questions=(SINUSOIDAL_POSITION_ENCODING, ROTARY_EMBEDDING, ALIBI_BIAS),
)
