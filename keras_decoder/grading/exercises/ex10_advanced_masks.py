"""Exercise set 10: advanced masks (packing, sliding windows, prefix-LM, cost).

================================= ================================================= ======
function                          returns                                           points
================================= ================================================= ======
``packed_segment_mask``           bool ``(B, T, T)``: same document AND causal        2
``sliding_window_attention_mask`` bool ``(Tq, Tk)``: causal band, bottom-right        2
``prefix_lm_attention_mask``      bool ``(B, T, T)``: bidirectional prefix            2
``mask_density``                  float ``(...)``: share of allowed pairs             1
================================= ================================================= ======

NumPy only: the grader never imports Keras.
"""

import numpy as np

from ..spec import Case, ExerciseSet, Mistake, Output, Question, format_value
from ._common import randint as _int


def _tril(query_len, key_len, top_left=False):
    i = np.arange(query_len)[:, None] + (0 if top_left else key_len - query_len)
    return np.arange(key_len)[None, :] <= i


# ---------------------------------------------------------------------------
# packed_segment_mask
# ---------------------------------------------------------------------------
def _packed(segment_ids, *, causal=True, segments=True, padding=True):
    s = np.asarray(segment_ids)
    t = s.shape[1]
    mask = np.ones((s.shape[0], t, t), bool)
    if segments:
        mask &= s[:, :, None] == s[:, None, :]
    if padding:
        mask &= (s[:, :, None] != 0) & (s[:, None, :] != 0)
    if causal:
        mask &= _tril(t, t)[None]
    return mask


def packed_segment_mask(segment_ids):
    """Reference: query ``i`` sees key ``j`` iff ``j <= i``, same segment, and neither is padding (id 0)."""
    return _packed(segment_ids)


def _segments(rng, batch, length):
    rows = []
    for _ in range(batch):
        lengths, total = [], 0
        while True:
            n = _int(rng, 2, 4)
            if total + n > length - 1:
                break
            lengths.append(n)
            total += n
        row = np.concatenate([np.full(n, k + 1) for k, n in enumerate(lengths)] + [np.zeros(length - total)])
        rows.append(row)
    return np.array(rows, dtype=np.int32)


def _packed_cases(rng):
    cases = []
    for batch, length in ((2, _int(rng, 7, 9)), (1, _int(rng, 10, 12)), (3, 6)):
        s = _segments(rng, batch, length)
        cases.append(Case((s,), {}, f"segment_ids={format_value(s)}"))
    return cases


PACKED_SEGMENT_MASK = Question(
    name="packed_segment_mask",
    signature="packed_segment_mask(segment_ids)",
    points=2,
    summary="bool (B, T, T): causal, within one document, padding (id 0) excluded.",
    reference=packed_segment_mask,
    cases=_packed_cases,
    output=Output("bool"),
    mistakes=(
        Mistake(
            "not_causal",
            "Each document is fully visible to itself, the future included. A packed decoder "
            "is still a decoder: AND the segment mask with the causal mask (j <= i).",
            impl=lambda segment_ids: _packed(segment_ids, causal=False),
        ),
        Mistake(
            "padding_attends_padding",
            "Padding (segment id 0) is treated as one more document, so pads attend to pads. "
            "Id 0 attends to nothing and nothing attends to it.",
            impl=lambda segment_ids: _packed(segment_ids, padding=False),
        ),
        Mistake(
            "documents_leak",
            "The segments are ignored: every token sees the earlier documents of its row. "
            "Allow a pair only when the two segment ids are equal.",
            impl=lambda segment_ids: _packed(segment_ids, segments=False),
        ),
    ),
    hints=(
        "Three conditions, ANDed: same segment, not padding, causal.",
        "`same = s[:, :, None] == s[:, None, :]` is (B, T, T); `real = (s[:, :, None] != 0) & "
        "(s[:, None, :] != 0)`.",
        "`return same & real & np.tril(np.ones((T, T), bool))`.",
    ),
)


# ---------------------------------------------------------------------------
# sliding_window_attention_mask
# ---------------------------------------------------------------------------
def _window(query_len, key_len, window, *, extra=0, top_left=False, causal=True):
    i = np.arange(query_len)[:, None] + (0 if top_left else key_len - query_len)
    j = np.arange(key_len)[None, :]
    near = j > i - window - extra
    if causal:
        return (j <= i) & near
    return near & (j < i + window)


def sliding_window_attention_mask(query_len, key_len, window):
    """Reference: bool ``(Tq, Tk)``; query ``i`` sits at ``p = Tk - Tq + i`` and sees ``p - window < j <= p``."""
    return _window(query_len, key_len, window)


def _window_cases(rng):
    cases = []
    for tq, tk, w in ((_int(rng, 6, 8), None, 3), (2, _int(rng, 7, 9), _int(rng, 3, 4)), (5, 5, 2),
                      (3, _int(rng, 6, 7), 2)):
        tk = tq if tk is None else tk
        cases.append(Case((tq, tk, w), {}, f"query_len={tq}, key_len={tk}, window={w}"))
    return cases


SLIDING_WINDOW_ATTENTION_MASK = Question(
    name="sliding_window_attention_mask",
    signature="sliding_window_attention_mask(query_len, key_len, window)",
    points=2,
    summary="bool (Tq, Tk): each query sees itself and the window - 1 keys before it (bottom-right).",
    reference=sliding_window_attention_mask,
    cases=_window_cases,
    output=Output("bool"),
    mistakes=(
        Mistake(
            "window_off_by_one",
            "Each query sees window + 1 keys. The window counts the query's own key: it sees "
            "itself and the window - 1 keys before it (p - window < j <= p).",
            impl=lambda query_len, key_len, window: _window(query_len, key_len, window, extra=1),
        ),
        Mistake(
            "top_left_alignment",
            "The band is aligned to the top-left. With fewer queries than keys (cached "
            "decoding), query i is the token at position key_len - query_len + i.",
            impl=lambda query_len, key_len, window: _window(query_len, key_len, window, top_left=True),
        ),
        Mistake(
            "not_causal",
            "The band is symmetric: queries also see the window - 1 keys after them. A "
            "sliding window in a decoder is causal.",
            impl=lambda query_len, key_len, window: _window(query_len, key_len, window, causal=False),
        ),
    ),
    hints=(
        "Start from the bottom-right causal mask of Lesson 03, then cut off the keys that are "
        "too far back.",
        "With `p = np.arange(Tq)[:, None] + (Tk - Tq)` and `j = np.arange(Tk)[None, :]`, the causal "
        "part is `j <= p`.",
        "`return (j <= p) & (j > p - window)`.",
    ),
)


# ---------------------------------------------------------------------------
# prefix_lm_attention_mask
# ---------------------------------------------------------------------------
def _prefix(prefix_lengths, seq_len, *, extra=0, query_side=False, use_prefix=True):
    lengths = np.asarray(prefix_lengths)[:, None, None]
    i = np.arange(seq_len)[None, :, None]
    j = np.arange(seq_len)[None, None, :]
    causal = np.broadcast_to(j <= i, (len(lengths), seq_len, seq_len))
    if not use_prefix:
        return causal.copy()
    if query_side:
        return causal | (i < lengths)
    return causal | (j < lengths + extra)


def prefix_lm_attention_mask(prefix_lengths, seq_len):
    """Reference: bool ``(B, T, T)``; query ``i`` of row ``b`` sees key ``j`` iff ``j <= i`` or ``j < prefix_lengths[b]``."""
    return _prefix(prefix_lengths, seq_len)


def _prefix_cases(rng):
    cases = []
    for batch, t in ((2, _int(rng, 6, 8)), (3, _int(rng, 5, 7))):
        lengths = np.array([_int(rng, 2, t - 2) for _ in range(batch)], dtype=np.int32)
        cases.append(Case((lengths, t), {}, f"prefix_lengths={format_value(lengths)}, seq_len={t}"))
    lengths = np.array([0, 3, 6], dtype=np.int32)
    cases.append(Case((lengths, 6), {}, f"prefix_lengths={format_value(lengths)}, seq_len=6"))
    return cases


PREFIX_LM_ATTENTION_MASK = Question(
    name="prefix_lm_attention_mask",
    signature="prefix_lm_attention_mask(prefix_lengths, seq_len)",
    points=2,
    summary="bool (B, T, T): causal, plus every key inside the row's prefix.",
    reference=prefix_lm_attention_mask,
    cases=_prefix_cases,
    output=Output("bool"),
    mistakes=(
        Mistake(
            "prefix_off_by_one",
            "The first continuation token is treated as part of the prefix (j <= prefix_length). "
            "A prefix of length P is the keys 0 .. P - 1.",
            impl=lambda prefix_lengths, seq_len: _prefix(prefix_lengths, seq_len, extra=1),
        ),
        Mistake(
            "prefix_queries_see_everything",
            "Queries inside the prefix see every key, the continuation included: the prefix "
            "then depends on the text it conditions, a leak. The rule is about the **keys**: "
            "any query may see a key in the prefix.",
            impl=lambda prefix_lengths, seq_len: _prefix(prefix_lengths, seq_len, query_side=True),
        ),
        Mistake(
            "causal_only",
            "This is the plain causal mask: the prefix is not bidirectional. Add every key "
            "j < prefix_lengths[b] to row b.",
            impl=lambda prefix_lengths, seq_len: _prefix(prefix_lengths, seq_len, use_prefix=False),
        ),
    ),
    hints=(
        "Two ways to see a key, ORed: it is not in the future, or it is in the prefix.",
        "`i = np.arange(T)[:, None]`, `j = np.arange(T)[None, :]`; the prefix part needs the "
        "lengths as `(B, 1, 1)`.",
        "`return (j <= i)[None] | (j[None] < np.asarray(prefix_lengths)[:, None, None])`.",
    ),
)


# ---------------------------------------------------------------------------
# mask_density
# ---------------------------------------------------------------------------
def mask_density(mask):
    """Reference: the share of ``True`` entries over the last two axes: float ``mask.shape[:-2]``."""
    return np.asarray(mask, bool).mean(axis=(-2, -1))


def _density_cases(rng):
    cases = []
    t = _int(rng, 5, 8)
    causal = np.tril(np.ones((t, t), bool))
    window = causal & ~np.tril(np.ones((t, t), bool), k=-3)
    cases.append(Case((np.stack([causal, window]),), {}, f"causal and window masks, shape (2, {t}, {t})"))
    s = _segments(rng, 3, _int(rng, 7, 9))
    packed = _packed(s)
    cases.append(Case((packed,), {}, f"packed masks of shape {packed.shape}"))
    random = rng.random((2, 2, 3, _int(rng, 4, 6))) < 0.4
    cases.append(Case((random,), {}, f"random mask of shape {random.shape}"))
    return cases


MASK_DENSITY = Question(
    name="mask_density",
    signature="mask_density(mask)",
    points=1,
    summary="float mask.shape[:-2]: the share of allowed (query, key) pairs of each mask.",
    reference=mask_density,
    cases=_density_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "blocked_share",
            "This is the share of blocked pairs. True means 'may attend': count the True entries.",
            impl=lambda mask: 1.0 - mask_density(mask),
        ),
        Mistake(
            "count_not_share",
            "This is the number of allowed pairs. Divide by the number of pairs, Tq * Tk.",
            impl=lambda mask: np.asarray(mask, bool).sum(axis=(-2, -1)).astype(np.float64),
        ),
        Mistake(
            "per_query_row",
            "The share is per query row (mean over the last axis only). Average over both the "
            "queries and the keys: axes (-2, -1).",
            impl=lambda mask: np.asarray(mask, bool).mean(axis=-1),
        ),
    ),
    hints=(
        "A boolean array's mean is the share of True entries.",
        "Average over the last two axes, and keep the others.",
        "`return np.asarray(mask, bool).mean(axis=(-2, -1))`.",
    ),
)


EXERCISE_SET = ExerciseSet(
    id="10_advanced_masks",
    title="Advanced masks",
    questions=(PACKED_SEGMENT_MASK, SLIDING_WINDOW_ATTENTION_MASK, PREFIX_LM_ATTENTION_MASK, MASK_DENSITY),
)
