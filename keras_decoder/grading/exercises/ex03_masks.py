"""Exercise set 03: masks and decoder inputs.

Five functions, each with a NumPy reference, a generator of fresh random
inputs, and a catalogue of diagnosed mistakes:

=============================== ======================================== ======
function                        returns                                  points
=============================== ======================================== ======
``padding_mask``                bool ``(B, T)``, True = real token       1
``causal_mask``                 bool ``(Tq, Tk)``, bottom-right aligned  2
``cross_attention_mask``        bool ``(B, Tdec, Tenc)``                 2
``shift_right``                 int ``(B, T)``                           1
``scaled_dot_product_attention`` float ``(B, Tq, H, D)``                  4
=============================== ======================================== ======

The mask convention is the project's: a mask is boolean and ``True`` means
"this query may attend to this key" (``keras.layers.MultiHeadAttention``'s
convention). NumPy only: the grader never imports Keras.
"""

import numpy as np

from ..spec import Case, ExerciseSet, Mistake, Output, Question, format_value
from ._common import label as _label, randint as _int, lengths_mask as _lengths_mask

# ---------------------------------------------------------------------------
# Helpers for drawing inputs.
# ---------------------------------------------------------------------------
_NEG = -0.5 * float(np.finfo(np.float32).max)  # a safe large negative for float32


def _padded_lengths(rng, batch, length):
    """Row lengths in ``[1, length]`` with at least one padded row and one full row."""
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    if batch > 1:
        lengths[1] = _int(rng, 1, length - 1)
    return rng.permutation(lengths)


# ---------------------------------------------------------------------------
# padding_mask
# ---------------------------------------------------------------------------
def padding_mask(token_ids, pad_id=0):
    """Reference: ``True`` for real tokens, ``False`` for padding; bool ``(B, T)``."""
    return np.asarray(token_ids) != pad_id


def _padding_cases(rng):
    cases = []
    # 1. The default pad id (0), right padding; the keyword is omitted.
    batch, length = _int(rng, 2, 3), _int(rng, 4, 7)
    ids = rng.integers(1, 50, size=(batch, length)).astype(np.int32)
    ids[~_lengths_mask(_padded_lengths(rng, batch, length), length)] = 0
    cases.append(Case((ids,), {}, _label(token_ids=ids)))
    # 2. A non-zero pad id, and 0 used as a real token.
    pad = _int(rng, 1, 3)
    batch, length = _int(rng, 2, 3), _int(rng, 4, 6)
    ids = rng.integers(4, 50, size=(batch, length)).astype(np.int32)
    ids[:, 0] = 0  # token 0 is a real token here
    ids[~_lengths_mask(_padded_lengths(rng, batch, length), length)] = pad
    cases.append(Case((ids,), {"pad_id": pad}, _label(token_ids=ids, pad_id=pad)))
    # 3. Left padding, pad id passed by keyword.
    batch, length = _int(rng, 2, 3), _int(rng, 3, 6)
    ids = rng.integers(1, 50, size=(batch, length)).astype(np.int32)
    ids[~_lengths_mask(_padded_lengths(rng, batch, length), length)[:, ::-1]] = 0
    cases.append(Case((ids,), {"pad_id": 0}, _label(token_ids=ids, pad_id=0)))
    return cases


PADDING_MASK = Question(
    name="padding_mask",
    signature="padding_mask(token_ids, pad_id=0)",
    points=1,
    summary="bool (B, T): True for real tokens, False for padding.",
    reference=padding_mask,
    cases=_padding_cases,
    output=Output("bool"),
    mistakes=(
        Mistake(
            "tf_tutorial_mask",
            "This is the old TensorFlow-tutorial mask: float, 1.0 = padding, shape "
            "(B, 1, 1, T). In Keras 3 a mask is bool, True = a real token (may be attended), "
            "shape (B, T).",
            impl=lambda token_ids, pad_id=0: (np.asarray(token_ids) == pad_id).astype(np.float32)[:, None, None, :],
        ),
        Mistake(
            "inverted_mask",
            "The mask is inverted: it is True at the padding. True must mean "
            '"a real token, may be attended". Use `!=`, not `==`.',
            impl=lambda token_ids, pad_id=0: np.asarray(token_ids) == pad_id,
        ),
        Mistake(
            "ignores_pad_id",
            "The mask ignores `pad_id` and treats 0 as padding. Compare with `pad_id`: "
            "here 0 is a real token.",
            impl=lambda token_ids, pad_id=0: np.asarray(token_ids) != 0,
        ),
        Mistake(
            "not_boolean",
            "The values are right but the mask is numeric (0/1). Return a bool mask: "
            "`ops.not_equal(token_ids, pad_id)` is already bool; do not cast it.",
            impl=lambda token_ids, pad_id=0: (np.asarray(token_ids) != pad_id).astype(np.int32),
        ),
        Mistake(
            "extra_axes",
            "The mask has extra axes, shape (B, 1, 1, T). Return the padding mask itself, "
            "(B, T); attention code adds the axes it needs.",
            impl=lambda token_ids, pad_id=0: (np.asarray(token_ids) != pad_id)[:, None, None, :],
        ),
    ),
    hints=(
        "Compare every token with `pad_id`; the comparison is the mask.",
        "`ops.not_equal(token_ids, pad_id)` (or `token_ids != pad_id` in NumPy) is True "
        "exactly at the real tokens, and is already bool.",
        "One line: `return ops.not_equal(ops.convert_to_tensor(token_ids), pad_id)`.",
    ),
)


# ---------------------------------------------------------------------------
# causal_mask
# ---------------------------------------------------------------------------
def causal_mask(query_len, key_len):
    """Reference: bool ``(Tq, Tk)``; query ``i`` sits at position ``key_len - query_len + i``."""
    q = np.arange(query_len)[:, None] + (key_len - query_len)  # absolute query positions
    k = np.arange(key_len)[None, :]
    return k <= q


def _causal_cases(rng):
    square = _int(rng, 3, 6)
    tq = _int(rng, 2, 4)
    tk = tq + _int(rng, 1, 3)
    step = _int(rng, 3, 7)
    tq2 = _int(rng, 2, 3)
    tk2 = tq2 + _int(rng, 2, 4)
    pairs = [(square, square), (tq, tk), (1, step), (tq2, tk2)]
    return [Case((a, b), {}, _label(query_len=a, key_len=b)) for a, b in pairs]


def _positions(query_len, key_len):
    return np.arange(query_len)[:, None] + (key_len - query_len), np.arange(key_len)[None, :]


def _additive(cases, outcomes, expected):
    """An additive bias (0 where allowed, very negative where blocked) instead of a bool mask."""
    for outcome, want in zip(outcomes, expected):
        if outcome.kind != "ok":
            return False
        got = np.asarray(outcome.value)
        if got.shape != want.shape or got.dtype.kind != "f":
            return False
        with np.errstate(invalid="ignore"):
            if not (np.all(got[want] == 0) and np.all(got[~want] <= -1e4)):
                return False
    return True


CAUSAL_MASK = Question(
    name="causal_mask",
    signature="causal_mask(query_len, key_len)",
    points=2,
    summary="bool (Tq, Tk), bottom-right aligned: the last query sees every key.",
    reference=causal_mask,
    cases=_causal_cases,
    output=Output("bool"),
    mistakes=(
        Mistake(
            "inverted_mask",
            "The mask is inverted: it is True for the future keys (what `np.triu(..., k=1)` "
            "gives). True must mean 'may attend': the past and the present.",
            impl=lambda query_len, key_len: ~causal_mask(query_len, key_len),
        ),
        Mistake(
            "top_left_alignment",
            "The mask is aligned to the top-left: query i sees keys 0..i, like "
            "`keras.ops.dot_product_attention(is_causal=True)` or `np.tril`. When "
            "query_len < key_len (a KV cache holds earlier keys), the queries are the *last* "
            "query_len positions: query i sits at position key_len - query_len + i.",
            impl=lambda query_len, key_len: np.tril(np.ones((query_len, key_len), bool)),
        ),
        Mistake(
            "excludes_diagonal",
            "Off by one: a query may not see its own position. A token attends to itself "
            "and to the past: use `<=`, not `<`.",
            impl=lambda query_len, key_len: _positions(query_len, key_len)[1]
            < _positions(query_len, key_len)[0],
        ),
        Mistake(
            "sees_next_token",
            "Off by one: each query also sees the next key, one step into the future. "
            "Query i may see keys up to its own position, no further.",
            impl=lambda query_len, key_len: _positions(query_len, key_len)[1]
            <= _positions(query_len, key_len)[0] + 1,
        ),
        Mistake(
            "square_mask",
            "The mask is square, (Tk, Tk). The result has one row per query: (Tq, Tk). "
            "Keep the last Tq rows of the square mask, or build the rows directly.",
            impl=lambda query_len, key_len: np.tril(np.ones((key_len, key_len), bool)),
        ),
        Mistake(
            "not_boolean",
            "The values are right but the mask is numeric (0/1). Return a bool mask; "
            "turn it into numbers only inside attention.",
            impl=lambda query_len, key_len: causal_mask(query_len, key_len).astype(np.float32),
        ),
        Mistake(
            "additive_mask",
            "This is an additive bias (0 / a large negative number), not a mask. Keep masks "
            "boolean until the last moment; the bias is made inside attention.",
            recognize=_additive,
        ),
    ),
    hints=(
        "Compare key positions with query positions: key j is visible to query i when "
        "j is not in i's future.",
        "With query_len < key_len the queries are the *last* query_len positions: query i sits "
        "at absolute position key_len - query_len + i.",
        "`q = ops.arange(query_len)[:, None] + (key_len - query_len)`, "
        "`k = ops.arange(key_len)[None, :]`, then `return k <= q` (ops.less_equal).",
    ),
)


# ---------------------------------------------------------------------------
# cross_attention_mask
# ---------------------------------------------------------------------------
def cross_attention_mask(decoder_padding_mask, encoder_padding_mask):
    """Reference: bool ``(B, Tdec, Tenc)``; only encoder padding (the keys) is masked."""
    dec = np.asarray(decoder_padding_mask, bool)
    enc = np.asarray(encoder_padding_mask, bool)
    return np.broadcast_to(enc[:, None, :], (dec.shape[0], dec.shape[1], enc.shape[1])).copy()


def _cross_cases(rng):
    cases = []
    # More encoder than decoder positions, then one of each, then fewer: never equal.
    for batch, longer in ((_int(rng, 2, 3), True), (1, rng.random() < 0.5), (_int(rng, 2, 3), False)):
        t_dec = _int(rng, 3, 5)
        t_enc = t_dec + _int(rng, 1, 3) if longer else t_dec - 1
        dec_lengths = rng.integers(1, t_dec, size=batch)  # every decoder row is padded
        dec = _lengths_mask(dec_lengths, t_dec)
        enc = _lengths_mask(_padded_lengths(rng, batch, t_enc), t_enc)
        cases.append(Case((dec, enc), {}, _label(decoder_padding_mask=dec, encoder_padding_mask=enc)))
    return cases


def _cross_causal_top_left(decoder_padding_mask, encoder_padding_mask):
    ref = cross_attention_mask(decoder_padding_mask, encoder_padding_mask)
    return ref & np.tril(np.ones(ref.shape[1:], bool))


def _cross_causal_bottom_right(decoder_padding_mask, encoder_padding_mask):
    ref = cross_attention_mask(decoder_padding_mask, encoder_padding_mask)
    t_dec, t_enc = ref.shape[1:]
    if t_enc < t_dec:
        raise ValueError("bottom-right causal mask needs key_len >= query_len")
    return ref & causal_mask(t_dec, t_enc)


def _cross_swapped(decoder_padding_mask, encoder_padding_mask):
    dec = np.asarray(decoder_padding_mask, bool)
    enc = np.asarray(encoder_padding_mask, bool)
    return np.broadcast_to(enc[:, :, None], (enc.shape[0], enc.shape[1], dec.shape[1])).copy()


def _cross_swapped_both(decoder_padding_mask, encoder_padding_mask):
    dec = np.asarray(decoder_padding_mask, bool)
    enc = np.asarray(encoder_padding_mask, bool)
    return enc[:, :, None] & dec[:, None, :]


CROSS_ATTENTION_MASK = Question(
    name="cross_attention_mask",
    signature="cross_attention_mask(decoder_padding_mask, encoder_padding_mask)",
    points=2,
    summary="bool (B, Tdec, Tenc): decoder queries may attend to every real encoder token.",
    reference=cross_attention_mask,
    cases=_cross_cases,
    output=Output("bool"),
    mistakes=(
        Mistake(
            "masks_queries_too",
            "The mask also blocks padded decoder positions (rows). Padding masks mask *keys*, "
            "not queries: here only encoder padding matters. A padded query's output is "
            "computed and then dropped by the loss mask; masking its row fully gives NaN or "
            "garbage instead.",
            impl=lambda decoder_padding_mask, encoder_padding_mask: np.asarray(decoder_padding_mask, bool)[:, :, None]
            & np.asarray(encoder_padding_mask, bool)[:, None, :],
        ),
        Mistake(
            "masks_queries_instead_of_keys",
            "The mask follows the decoder padding (queries) instead of the encoder padding "
            "(keys). In cross-attention the keys are the encoder's tokens: mask those.",
            impl=lambda decoder_padding_mask, encoder_padding_mask: np.broadcast_to(
                np.asarray(decoder_padding_mask, bool)[:, :, None],
                (len(decoder_padding_mask), np.shape(decoder_padding_mask)[1], np.shape(encoder_padding_mask)[1]),
            ),
        ),
        Mistake(
            "swapped_axes",
            "The axes are swapped: the result is (B, Tenc, Tdec). Attention masks are "
            "(batch, queries, keys), and the queries are the decoder's: (B, Tdec, Tenc).",
            impl=(_cross_swapped, _cross_swapped_both),
        ),
        Mistake(
            "inverted_mask",
            "The mask is inverted: it is True at the encoder padding. True must mean "
            "'may attend'.",
            impl=lambda decoder_padding_mask, encoder_padding_mask: ~cross_attention_mask(
                decoder_padding_mask, encoder_padding_mask
            ),
        ),
        Mistake(
            "not_broadcast",
            "The mask has shape (B, 1, Tenc). It broadcasts in attention, but this function "
            "returns the full (B, Tdec, Tenc) mask: use `ops.broadcast_to`.",
            impl=lambda decoder_padding_mask, encoder_padding_mask: np.asarray(encoder_padding_mask, bool)[:, None, :],
        ),
        Mistake(
            "causal_cross_attention",
            "The mask is causal. Cross-attention is not: every decoder position may see the "
            "whole (real) encoder output, which exists before decoding starts.",
            impl=(_cross_causal_top_left, _cross_causal_bottom_right),
        ),
        Mistake(
            "not_boolean",
            "The values are right but the mask is numeric. Return a bool mask.",
            impl=lambda decoder_padding_mask, encoder_padding_mask: cross_attention_mask(
                decoder_padding_mask, encoder_padding_mask
            ).astype(np.float32),
        ),
        Mistake(
            "additive_mask",
            "This is an additive bias (0 / a large negative number), not a mask. Keep masks "
            "boolean; the bias is made inside attention.",
            recognize=_additive,
        ),
    ),
    hints=(
        "Queries come from the decoder, keys from the encoder. Which padding decides whether "
        "a key may be attended?",
        "Only the encoder padding mask matters. Give it a query axis, (B, 1, Tenc), then "
        "broadcast it to (B, Tdec, Tenc); the decoder mask only gives you Tdec.",
        "`ops.broadcast_to(enc[:, None, :], (B, Tdec, Tenc))` with "
        "`B, Tdec = ops.shape(decoder_padding_mask)` and `Tenc = ops.shape(enc)[1]`.",
    ),
)


# ---------------------------------------------------------------------------
# shift_right
# ---------------------------------------------------------------------------
def shift_right(token_ids, start_id):
    """Reference: ``[start_id, t0, ..., t_{T-2}]`` per row; same shape and dtype."""
    ids = np.asarray(token_ids)
    start = np.full((ids.shape[0], 1), start_id, ids.dtype)
    return np.concatenate([start, ids[:, :-1]], axis=1)


def _shift_cases(rng):
    cases = []
    for batch, length in ((_int(rng, 2, 3), _int(rng, 4, 7)), (1, _int(rng, 3, 5)), (_int(rng, 2, 3), 1)):
        ids = rng.integers(10, 100, size=(batch, length)).astype(np.int32)
        if length > 2:
            ids[~_lengths_mask(_padded_lengths(rng, batch, length), length)] = 0
        start = _int(rng, 1, 5)
        cases.append(Case((ids, start), {}, _label(token_ids=ids, start_id=start)))
    return cases


def _full_like_column(ids, value):
    ids = np.asarray(ids)
    return np.full((ids.shape[0], 1), value, ids.dtype)


SHIFT_RIGHT = Question(
    name="shift_right",
    signature="shift_right(token_ids, start_id)",
    points=1,
    summary="(B, T): start_id, then the tokens without the last one (the decoder input).",
    reference=shift_right,
    cases=_shift_cases,
    output=Output("int"),
    mistakes=(
        Mistake(
            "shifted_left",
            "The tokens are shifted left: that is the *label* sequence (what the decoder "
            "predicts), not its input. The input starts with start_id and drops the last token.",
            impl=(
                lambda token_ids, start_id: np.concatenate(
                    [np.asarray(token_ids)[:, 1:], _full_like_column(token_ids, start_id)], axis=1
                ),
                lambda token_ids, start_id: np.concatenate(
                    [np.asarray(token_ids)[:, 1:], _full_like_column(token_ids, 0)], axis=1
                ),
            ),
        ),
        Mistake(
            "overwrites_first_token",
            "start_id replaces the first token instead of shifting the sequence: the first "
            "token is lost and the last one kept. Drop the *last* token and put start_id in front.",
            impl=lambda token_ids, start_id: np.concatenate(
                [_full_like_column(token_ids, start_id), np.asarray(token_ids)[:, 1:]], axis=1
            ),
        ),
        Mistake(
            "keeps_last_token",
            "The result is one token longer than the input: start_id was prepended but the "
            "last token was not dropped. The decoder input has the same length T.",
            impl=lambda token_ids, start_id: np.concatenate(
                [_full_like_column(token_ids, start_id), np.asarray(token_ids)], axis=1
            ),
        ),
        Mistake(
            "roll_wraps_around",
            "`roll` wraps the last token around to the front. Put start_id there instead "
            "(concatenate, or overwrite column 0 after rolling).",
            impl=lambda token_ids, start_id: np.roll(np.asarray(token_ids), 1, axis=1),
        ),
        Mistake(
            "pad_instead_of_start",
            "The sequence is shifted, but it starts with 0 (the pad id) instead of start_id.",
            impl=lambda token_ids, start_id: np.concatenate(
                [_full_like_column(token_ids, 0), np.asarray(token_ids)[:, :-1]], axis=1
            ),
        ),
        Mistake(
            "shifted_batch_axis",
            "The shift runs along the batch axis (axis 0). Shift each sequence along time, axis 1.",
            impl=lambda token_ids, start_id: np.concatenate(
                [np.full((1, np.shape(token_ids)[1]), start_id, np.asarray(token_ids).dtype), np.asarray(token_ids)[:-1]],
                axis=0,
            ),
        ),
        Mistake(
            "not_integer",
            "The values are right but the ids are floats. Token ids are integers: keep the "
            "input's dtype (e.g. `ops.full_like`).",
            impl=lambda token_ids, start_id: shift_right(token_ids, start_id).astype(np.float32),
        ),
    ),
    hints=(
        "The decoder input at step t is the token at step t - 1; step 0 gets start_id.",
        "Build a (B, 1) column of start_id and concatenate it in front of all but the last "
        "token: `token_ids[:, :-1]`.",
        "`start = ops.full_like(token_ids[:, :1], start_id)`, then "
        "`return ops.concatenate([start, token_ids[:, :-1]], axis=1)`.",
    ),
)


# ---------------------------------------------------------------------------
# scaled_dot_product_attention
# ---------------------------------------------------------------------------
def _attention(
    query,
    key,
    value,
    mask=None,
    *,
    scale="sqrt",
    axis=-1,
    fill=-np.inf,
    zero_rows=True,
    expand=True,
    invert=False,
    use_mask=True,
    out="bqhd",
):
    """Attention in float64, with switches that reproduce common mistakes."""
    q, k, v = (np.asarray(t, np.float64) for t in (query, key, value))
    depth = q.shape[-1]
    factor = {"sqrt": 1 / np.sqrt(depth), "none": 1.0, "depth": 1 / depth}[scale]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * factor  # (B, H, Tq, Tk)
    allowed = None
    if mask is not None and use_mask:
        allowed = np.asarray(mask, bool)
        if invert:
            allowed = ~allowed
        if expand and allowed.ndim == 3:
            allowed = allowed[:, None]  # (B, Tq, Tk) -> (B, 1, Tq, Tk): broadcast over heads
        scores = np.where(allowed, scores, fill)  # raises when the mask cannot broadcast
    with np.errstate(invalid="ignore", over="ignore"):
        peak = scores.max(axis=axis, keepdims=True)
        if zero_rows:
            peak = np.where(np.isfinite(peak), peak, 0.0)
        weights = np.exp(scores - peak)
        total = weights.sum(axis=axis, keepdims=True)
        if zero_rows:
            weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
        else:
            weights = weights / total
    return np.einsum(f"bhqk,bkhd->{out}", weights, v)


def scaled_dot_product_attention(query, key, value, mask=None):
    """Reference: softmax(Q Kᵀ / √D) V per head; fully masked rows give 0.

    ``query`` is ``(B, Tq, H, D)``, ``key`` and ``value`` are ``(B, Tk, H, D)``;
    ``mask`` is ``None`` or bool, ``(Tq, Tk)``, ``(B, Tq, Tk)`` or ``(B, 1, Tk)``.
    Returns ``(B, Tq, H, D)``.
    """
    q, k, v = (np.asarray(t, np.float64) for t in (query, key, value))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if mask is None:
        allowed = np.ones(scores.shape[-2:], bool)  # (Tq, Tk)
    else:
        allowed = np.asarray(mask, bool)
        if allowed.ndim == 3:
            allowed = allowed[:, None]  # (B, Tq, Tk) or (B, 1, Tk) -> add a head axis
    scores = np.where(allowed, scores, -np.inf)
    peak = scores.max(axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)  # a fully masked row has no finite score
    weights = np.exp(scores - peak)  # exp(-inf) = 0 at masked keys
    total = weights.sum(axis=-1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)  # 0, not NaN
    return np.einsum("bhqk,bkhd->bqhd", weights, v)  # (B, Tq, H, D)


def _qkv(rng, batch, t_q, t_k, heads, depth):
    def draw(length):
        return (1.5 * rng.standard_normal((batch, length, heads, depth))).astype(np.float32)

    return draw(t_q), draw(t_k), draw(t_k)


def _attention_cases(rng):
    depth = lambda: int(rng.choice([4, 8, 9, 16]))  # noqa: E731
    cases = []

    # 1. No mask (the default).
    t = _int(rng, 3, 5)
    q, k, v = _qkv(rng, 2, t, t, 2, depth())
    cases.append(Case((q, k, v), {}, f"query {q.shape}, key/value {k.shape}, no mask"))

    # 2. A (Tq, Tk) causal mask with fewer queries than keys (a KV cache).
    t_q = _int(rng, 2, 3)
    t_k = t_q + _int(rng, 2, 3)
    q, k, v = _qkv(rng, 2, t_q, t_k, 2, depth())
    mask = causal_mask(t_q, t_k)
    cases.append(Case((q, k, v), {"mask": mask}, f"query {q.shape}, key/value {k.shape}, mask={format_value(mask)}"))

    # 3-4. (B, Tq, Tk) masks: padding + causal, with one fully masked query row.
    #      B == H in case 3 and B != H in case 4, so a mask that is not given a head
    #      axis is caught either way.
    for batch, heads in ((2, 2), (3, 2)):
        t = _int(rng, 3, 5)
        q, k, v = _qkv(rng, batch, t, t, heads, depth())
        keys = _lengths_mask(_padded_lengths(rng, batch, t), t)
        mask = causal_mask(t, t)[None] & keys[:, None, :]
        mask[_int(rng, 0, batch - 1), _int(rng, 0, t - 1), :] = False  # nothing to attend to
        cases.append(
            Case((q, k, v), {"mask": mask}, f"query {q.shape}, key/value {k.shape}, mask (B, Tq, Tk)={format_value(mask)}")
        )

    # 5. A (B, 1, Tk) key-padding mask, with a fully padded row.
    t_q, t_k = _int(rng, 2, 4), _int(rng, 3, 5)
    q, k, v = _qkv(rng, 2, t_q, t_k, 3, depth())
    keys = _lengths_mask(_padded_lengths(rng, 2, t_k), t_k)
    keys[_int(rng, 0, 1)] = False
    mask = keys[:, None, :]
    cases.append(Case((q, k, v), {"mask": mask}, f"query {q.shape}, key/value {k.shape}, mask (B, 1, Tk)={format_value(mask)}"))
    return cases


def _variant(**switches):
    def impl(query, key, value, mask=None):
        return _attention(query, key, value, mask, **switches)

    return impl


def _has_mask(case):
    return case.kwargs.get("mask") is not None


def _fully_masked(case):
    mask = case.kwargs.get("mask")
    return mask is not None and not np.asarray(mask).any(axis=-1).all()


SCALED_DOT_PRODUCT_ATTENTION = Question(
    name="scaled_dot_product_attention",
    signature="scaled_dot_product_attention(query, key, value, mask=None)",
    points=4,
    summary="(B, Tq, H, D): softmax(Q Kᵀ / √D) V per head; fully masked rows give 0.",
    reference=scaled_dot_product_attention,
    cases=_attention_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "missing_scale",
            "The scores are not scaled. Divide Q Kᵀ by √D (D = the head size, "
            "query.shape[-1]); without it the softmax saturates as D grows.",
            impl=_variant(scale="none"),
        ),
        Mistake(
            "scaled_by_depth",
            "The scores are divided by D instead of √D.",
            impl=_variant(scale="depth"),
        ),
        Mistake(
            "softmax_over_queries",
            "The softmax runs over the wrong axis (the queries). Each query's weights over "
            "the *keys* must sum to 1: softmax over the last axis of (B, H, Tq, Tk).",
            impl=_variant(axis=-2),
            applies=lambda case: not _has_mask(case),
        ),
        Mistake(
            "ignores_mask",
            "The mask is ignored: masked keys still get attention weight.",
            impl=_variant(use_mask=False),
        ),
        Mistake(
            "inverted_mask",
            "The mask is used inverted: True must mean 'may attend', so keep the scores where "
            "the mask is True and block them where it is False.",
            impl=(_variant(invert=True), _variant(invert=True, fill=_NEG, zero_rows=False)),
        ),
        Mistake(
            "nan_on_fully_masked_row",
            "A query whose keys are all masked gives NaN: softmax over a row of -inf is 0/0. "
            "Fill with a large finite negative number (a fraction of the dtype's minimum, "
            "not -inf and not -1e9) and set the output of fully masked rows to 0, e.g. "
            "multiply the weights by `ops.any(mask, axis=-1, keepdims=True)`.",
            impl=_variant(zero_rows=False),
            applies=_fully_masked,
        ),
        Mistake(
            "mean_on_fully_masked_row",
            "A query whose keys are all masked gets the plain average of the values (a large "
            "negative fill makes its softmax uniform). Such rows must give exactly 0: multiply "
            "the weights by `ops.any(mask, axis=-1, keepdims=True)`.",
            impl=_variant(fill=_NEG, zero_rows=False),
            applies=_fully_masked,
        ),
        Mistake(
            "mask_not_broadcast_over_heads",
            "A (B, Tq, Tk) mask is applied to the (B, H, Tq, Tk) scores without a head axis, "
            "so broadcasting lines the batch up with the heads (or fails). Expand it to "
            "(B, 1, Tq, Tk) first.",
            impl=_variant(expand=False),
            applies=_has_mask,
        ),
        Mistake(
            "output_layout",
            "The output is (B, H, Tq, D). The layout in and out is (batch, seq, heads, "
            "head_dim): return (B, Tq, H, D).",
            impl=_variant(out="bhqd"),
        ),
    ),
    hints=(
        "Scores: one dot product per (query, key) pair and head, "
        "`ops.einsum('bqhd,bkhd->bhqk', q, k)`, scaled by 1/√D. Then a softmax over the keys, "
        "then a weighted sum of the values.",
        "A (B, Tq, Tk) mask needs a head axis to match (B, H, Tq, Tk) scores: "
        "`mask[:, None]` (a (Tq, Tk) mask broadcasts as it is). Replace blocked scores with a "
        "large negative number with `ops.where(mask, scores, big_negative)`.",
        "After the softmax, zero the fully masked rows: "
        "`weights = weights * ops.cast(ops.any(mask, axis=-1, keepdims=True), weights.dtype)`; "
        "then `ops.einsum('bhqk,bkhd->bqhd', weights, v)`.",
    ),
)


EXERCISE_SET = ExerciseSet(
    id="03_masks",
    title="Masks and decoder inputs",
    questions=(PADDING_MASK, CAUSAL_MASK, CROSS_ATTENTION_MASK, SHIFT_RIGHT, SCALED_DOT_PRODUCT_ATTENTION),
)
