"""Exercise set 09: generation.

======================== ============================================== ======
function                 returns                                        points
======================== ============================================== ======
``repetition_penalty``   float ``(B, V)``: CTRL-penalised logits            2
``top_p_probs``          float ``(B, V)``: the nucleus, renormalised        2
``no_repeat_ngram_mask`` bool ``(B, V)``: tokens that would repeat an n-gram 2
======================== ============================================== ======

NumPy only: the grader never imports Keras.
"""

import numpy as np

from ..spec import Case, ExerciseSet, Mistake, Output, Question
from ._common import label as _label, randint as _int


# ---------------------------------------------------------------------------
# repetition_penalty
# ---------------------------------------------------------------------------
def _seen(generated_ids, vocab_size):
    ids = np.asarray(generated_ids)
    seen = np.zeros((ids.shape[0], vocab_size), bool)
    for b, row in enumerate(ids):
        real = row[row >= 0]
        seen[b, real] = True
    return seen


def repetition_penalty(logits, generated_ids, penalty):
    """Reference (CTRL): for tokens present in ``generated_ids`` (``-1`` = no token),
    ``logit / penalty`` if ``logit > 0`` else ``logit * penalty``; other logits unchanged."""
    logits = np.asarray(logits, np.float64)
    seen = _seen(generated_ids, logits.shape[-1])
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalised, logits)


def _penalty_cases(rng):
    cases = []
    for b, v, t, penalty in ((2, 8, 5, 1.5), (3, _int(rng, 6, 9), _int(rng, 4, 6), 1.3), (2, 6, 6, 2.0)):
        logits = (2.0 * rng.standard_normal((b, v))).astype(np.float32)
        logits[:, 0], logits[:, 1] = 1.5, -1.5  # a positive and a negative seen logit in every row
        ids = rng.integers(2, v - 1, size=(b, t)).astype(np.int32)  # never the last token ...
        ids[:, 0], ids[:, 1] = 0, 1
        ids[:, 2] = ids[:, 3]  # a token seen twice
        ids[0, -1] = -1  # ... and "no token" at the end of row 0
        cases.append(Case((logits, ids, penalty), {}, _label(logits=logits, generated_ids=ids, penalty=penalty)))
    return cases


def _penalty_always_divide(logits, generated_ids, penalty):
    logits = np.asarray(logits, np.float64)
    return np.where(_seen(generated_ids, logits.shape[-1]), logits / penalty, logits)


def _penalty_inverted(logits, generated_ids, penalty):
    logits = np.asarray(logits, np.float64)
    penalised = np.where(logits > 0, logits * penalty, logits / penalty)
    return np.where(_seen(generated_ids, logits.shape[-1]), penalised, logits)


def _penalty_per_occurrence(logits, generated_ids, penalty):
    logits = np.asarray(logits, np.float64).copy()
    for b, row in enumerate(np.asarray(generated_ids)):
        for token in row[row >= 0]:
            x = logits[b, token]
            logits[b, token] = x / penalty if x > 0 else x * penalty
    return logits


def _penalty_minus_one_wraps(logits, generated_ids, penalty):
    logits = np.asarray(logits, np.float64)
    ids = np.asarray(generated_ids)
    seen = np.zeros(logits.shape, bool)
    for b, row in enumerate(ids):
        seen[b, row] = True  # -1 indexes the last token
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalised, logits)


REPETITION_PENALTY = Question(
    name="repetition_penalty",
    signature="repetition_penalty(logits, generated_ids, penalty)",
    points=2,
    summary="float (B, V): logits of already generated tokens made less likely, CTRL's way.",
    reference=repetition_penalty,
    cases=_penalty_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "always_divided",
            "Every seen logit was divided by the penalty. Dividing a negative logit brings it "
            "closer to 0: the token becomes MORE likely. Multiply negative logits instead.",
            impl=_penalty_always_divide,
        ),
        Mistake(
            "penalty_inverted",
            "Positive logits were multiplied and negative ones divided: that rewards repetition. "
            "With penalty > 1, divide positive logits and multiply negative ones.",
            impl=_penalty_inverted,
        ),
        Mistake(
            "penalised_per_occurrence",
            "A token seen twice was penalised twice. CTRL's penalty applies once to every token "
            "present, however often it occurs.",
            impl=_penalty_per_occurrence,
        ),
        Mistake(
            "minus_one_indexed_last_token",
            "generated_ids uses -1 for 'no token', and -1 indexed the last token of the "
            "vocabulary. Ignore the -1 entries.",
            impl=_penalty_minus_one_wraps,
        ),
    ),
    hints=(
        "First find which tokens are present in each row: a bool (B, V) table.",
        "`seen = ops.any(generated_ids[:, :, None] == ops.arange(V)[None, None, :], axis=1)`: "
        "-1 never equals a token id.",
        "`penalised = ops.where(logits > 0, logits / penalty, logits * penalty)`; "
        "`return ops.where(seen, penalised, logits)`.",
    ),
)


# ---------------------------------------------------------------------------
# top_p_probs
# ---------------------------------------------------------------------------
def _softmax(logits):
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _nucleus(logits, p, *, crossing=True, renormalise=True, descending=True):
    probs = _softmax(logits)
    out = np.zeros_like(probs)
    for b, row in enumerate(probs):
        order = np.argsort(-row if descending else row, kind="stable")
        before = np.cumsum(row[order]) - row[order]
        keep_sorted = before < p if crossing else np.cumsum(row[order]) <= p
        keep_sorted[0] = True  # always at least one token
        kept = order[keep_sorted]
        out[b, kept] = row[kept]
    return out / out.sum(-1, keepdims=True) if renormalise else out


def top_p_probs(logits, p):
    """Reference: softmax, keep the most likely tokens until their mass reaches ``p`` (the token
    that crosses ``p`` is kept; at least one token), zero the rest, renormalise. ``(B, V)``."""
    return _nucleus(logits, p)


def _top_p_cases(rng):
    cases = []
    for b, v, p in ((3, 8, 0.9), (2, _int(rng, 6, 10), 0.6), (3, 6, 0.5)):
        logits = (1.5 * rng.standard_normal((b, v))).astype(np.float32)
        cases.append(Case((logits, p), {}, _label(logits=logits, p=p)))
    return cases


TOP_P_PROBS = Question(
    name="top_p_probs",
    signature="top_p_probs(logits, p)",
    points=2,
    summary="float (B, V): the top-p (nucleus) distribution, zeros outside the nucleus.",
    reference=top_p_probs,
    cases=_top_p_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "crossing_token_dropped",
            "The token whose probability makes the mass reach p was dropped (you kept tokens while "
            "the cumulative sum INCLUDING them is <= p). Keep a token when the mass of the tokens "
            "ranked above it is still < p.",
            impl=lambda logits, p: _nucleus(logits, p, crossing=False),
        ),
        Mistake(
            "not_renormalised",
            "The kept probabilities do not sum to 1. Divide them by their sum.",
            impl=lambda logits, p: _nucleus(logits, p, renormalise=False),
        ),
        Mistake(
            "least_likely_kept",
            "The tokens were sorted in ascending order, so the nucleus holds the least likely "
            "tokens. Sort by decreasing probability.",
            impl=lambda logits, p: _nucleus(logits, p, descending=False),
        ),
    ),
    hints=(
        "Sort each row's probabilities in decreasing order and walk down until the mass reaches p.",
        "With `sorted_p` the decreasing probabilities, `before = cumsum(sorted_p) - sorted_p` is the "
        "mass ranked above each token; keep the tokens with `before < p`.",
        "Build the kept mask in sorted order, scatter it back (e.g. `np.put_along_axis`), "
        "`q = np.where(keep, probs, 0)`, `return q / q.sum(-1, keepdims=True)`.",
    ),
)


# ---------------------------------------------------------------------------
# no_repeat_ngram_mask
# ---------------------------------------------------------------------------
def _banned(generated_ids, n, vocab_size):
    ids = np.asarray(generated_ids)
    banned = np.zeros((ids.shape[0], vocab_size), bool)
    if n == 1:
        return _seen(ids, vocab_size)
    t = ids.shape[1]
    for b, row in enumerate(ids):
        prefix = row[t - (n - 1):]
        for j in range(t - n + 1):
            if np.array_equal(row[j:j + n - 1], prefix):
                banned[b, row[j + n - 1]] = True
    return banned


def no_repeat_ngram_mask(generated_ids, n, vocab_size):
    """Reference: ``True`` for each token ``x`` such that ``last n-1 tokens + [x]`` is an
    n-gram that already occurs in the row. ``(B, V)`` bool; ``n >= 2``."""
    return _banned(generated_ids, n, vocab_size)


def _ngram_cases(rng):
    cases = []
    for n, v, t in ((2, 6, _int(rng, 9, 12)), (3, 5, _int(rng, 10, 13)), (2, 8, 8)):
        b = 3
        ids = rng.integers(0, v, size=(b, t)).astype(np.int32)
        # Plant repeats: the last n-1 tokens also occur twice earlier, followed by two tokens.
        for row in range(b - 1):
            tail = ids[row, t - (n - 1):]
            ids[row, 0:n - 1] = tail
            ids[row, n - 1] = (tail[-1] + 1) % v
            ids[row, n + 1:2 * n] = tail
            ids[row, 2 * n] = (tail[-1] + 2) % v
        cases.append(Case((ids, n, v), {}, _label(generated_ids=ids, n=n, vocab_size=v)))
    return cases


NO_REPEAT_NGRAM_MASK = Question(
    name="no_repeat_ngram_mask",
    signature="no_repeat_ngram_mask(generated_ids, n, vocab_size)",
    points=2,
    summary="bool (B, V): True for every next token that would complete an n-gram already in the row.",
    reference=no_repeat_ngram_mask,
    cases=_ngram_cases,
    output=Output("bool"),
    mistakes=(
        Mistake(
            "prefix_too_long",
            "You matched the last n tokens and banned what followed: that forbids repeating "
            "(n+1)-grams. An n-gram is the last n-1 tokens plus the candidate.",
            impl=lambda generated_ids, n, vocab_size: _banned(generated_ids, n + 1, vocab_size),
        ),
        Mistake(
            "prefix_too_short",
            "You matched only the last n-2 tokens: that forbids repeating (n-1)-grams. "
            "Match the last n-1 tokens.",
            impl=lambda generated_ids, n, vocab_size: _banned(generated_ids, n - 1, vocab_size),
        ),
        Mistake(
            "every_seen_token",
            "Every token already present was banned. Only the tokens that FOLLOWED an earlier "
            "occurrence of the last n-1 tokens are banned.",
            impl=lambda generated_ids, n, vocab_size: _seen(generated_ids, vocab_size),
        ),
    ),
    hints=(
        "Take the last n-1 tokens of the row. Find every earlier place where the same n-1 tokens occur.",
        "For a window starting at j (j = 0 .. T-n), compare ids[j : j+n-1] with the last n-1 tokens; "
        "if equal, the token ids[j+n-1] is banned.",
        "Loop over rows and windows in NumPy: `banned[b, row[j + n - 1]] = True` when "
        "`np.array_equal(row[j:j + n - 1], row[T - n + 1:])`.",
    ),
)


EXERCISE_SET = ExerciseSet(
    id="09_generation",
    title="Generation",
    questions=(REPETITION_PENALTY, TOP_P_PROBS, NO_REPEAT_NGRAM_MASK),
)
