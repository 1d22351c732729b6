"""Exercise set 06: RNN decoders (Bahdanau and Luong scores, the context vector).

========================== ====================================================== ======
function                   returns                                                points
========================== ====================================================== ======
``bahdanau_scores``        float ``(B, S)``: ``vᵀ tanh(W q + U h_j)``               2
``luong_general_scores``   float ``(B, S)``: ``qᵀ W h_j``                           1
``context_vector``         float ``(B, M)``: masked softmax, weighted sum           2
========================== ====================================================== ======

NumPy only: the grader never imports Keras.
"""

import numpy as np

from ..spec import Case, ExerciseSet, Mistake, Output, Question, format_value
from ._common import randint as _int


def _softmax(scores, axis=-1):
    e = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------------------
# bahdanau_scores
# ---------------------------------------------------------------------------
def _bahdanau(query, memory, w_query, w_key, v, *, tanh=True, tanh_outside=False, use_query=True,
              softmax=False):
    q = np.asarray(query, np.float64) @ w_query                      # (B, A)
    k = np.asarray(memory, np.float64) @ w_key                       # (B, S, A)
    hidden = (q[:, None, :] if use_query else 0.0) + k               # (B, S, A)
    if tanh and not tanh_outside:
        hidden = np.tanh(hidden)
    scores = hidden @ np.asarray(v, np.float64)                      # (B, S)
    if tanh_outside:
        scores = np.tanh(scores)
    return _softmax(scores) if softmax else scores


def bahdanau_scores(query, memory, w_query, w_key, v):
    """Reference: ``scores[b, j] = v · tanh(query[b] @ w_query + memory[b, j] @ w_key)``; ``(B, S)``."""
    return _bahdanau(query, memory, w_query, w_key, v)


def _bahdanau_cases(rng):
    cases = []
    for b, s, u, m, a in ((2, _int(rng, 3, 5), 4, 6, 3), (3, _int(rng, 2, 4), 5, 5, 4), (1, 6, 3, 4, 5)):
        query = (1.5 * rng.standard_normal((b, u))).astype(np.float32)
        memory = (1.5 * rng.standard_normal((b, s, m))).astype(np.float32)
        w_query = rng.standard_normal((u, a)).astype(np.float32)
        w_key = rng.standard_normal((m, a)).astype(np.float32)
        v = rng.standard_normal(a).astype(np.float32)
        cases.append(Case((query, memory, w_query, w_key, v), {},
                          f"query {query.shape}, memory {memory.shape}, w_query {w_query.shape}, "
                          f"w_key {w_key.shape}, v {v.shape}"))
    return cases


def _bahdanau_variant(**switches):
    def impl(query, memory, w_query, w_key, v):
        return _bahdanau(query, memory, w_query, w_key, v, **switches)

    return impl


BAHDANAU_SCORES = Question(
    name="bahdanau_scores",
    signature="bahdanau_scores(query, memory, w_query, w_key, v)",
    points=2,
    summary="(B, S): the additive score v · tanh(W q + U h_j) of every source position.",
    reference=bahdanau_scores,
    cases=_bahdanau_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "no_tanh",
            "The tanh is missing. Without it the score is linear, v·Wq + v·Uh_j, and the query "
            "term is the same for every j, so it cancels in the softmax.",
            impl=_bahdanau_variant(tanh=False),
        ),
        Mistake(
            "tanh_after_v",
            "The tanh is applied after the product with v. The hidden layer is tanh(Wq + Uh_j) "
            "(shape (B, S, A)); v then reduces it to one score.",
            impl=_bahdanau_variant(tanh_outside=True),
        ),
        Mistake(
            "query_left_out",
            "The query is not used: every decoder step would attend the same way. Add "
            "query @ w_query, broadcast over the source positions, before the tanh.",
            impl=_bahdanau_variant(use_query=False),
        ),
        Mistake(
            "softmax_applied",
            "These are attention weights: the question asks for the scores, before the softmax.",
            impl=_bahdanau_variant(softmax=True),
        ),
    ),
    hints=(
        "Project both sides into the score space A: the query (B, U) -> (B, A), the memory "
        "(B, S, M) -> (B, S, A).",
        "Broadcast: `q[:, None, :] + k` is (B, S, A). Then tanh, then the product with v.",
        "`return ops.tanh(ops.expand_dims(query @ w_query, 1) + memory @ w_key) @ v`.",
    ),
)


# ---------------------------------------------------------------------------
# luong_general_scores
# ---------------------------------------------------------------------------
def _luong(query, memory, w, *, use_w=True, transpose=False, scale=False, softmax=False):
    q = np.asarray(query, np.float64)
    h = np.asarray(memory, np.float64)
    if use_w:
        h = h @ (np.asarray(w).T if transpose else np.asarray(w))    # (B, S, U)
    scores = np.einsum("bu,bsu->bs", q, h)
    if scale:
        scores = scores / np.sqrt(q.shape[-1])
    return _softmax(scores) if softmax else scores


def luong_general_scores(query, memory, w):
    """Reference: ``scores[b, j] = query[b] · (memory[b, j] @ w)``, ``w`` of shape ``(M, U)``; ``(B, S)``."""
    return _luong(query, memory, w)


def _luong_cases(rng):
    cases = []
    for b, s, u, m in ((2, _int(rng, 3, 5), 4, 6), (3, _int(rng, 2, 4), 5, 5), (1, 6, 3, 3)):
        query = rng.standard_normal((b, u)).astype(np.float32)
        memory = rng.standard_normal((b, s, m)).astype(np.float32)
        w = rng.standard_normal((m, u)).astype(np.float32)
        cases.append(Case((query, memory, w), {}, f"query {query.shape}, memory {memory.shape}, w {w.shape}"))
    return cases


def _luong_variant(**switches):
    def impl(query, memory, w):
        return _luong(query, memory, w, **switches)

    return impl


LUONG_GENERAL_SCORES = Question(
    name="luong_general_scores",
    signature="luong_general_scores(query, memory, w)",
    points=1,
    summary="(B, S): the multiplicative score q · (W h_j) of every source position.",
    reference=luong_general_scores,
    cases=_luong_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "dot_score",
            "This is Luong's 'dot' score, q · h_j, without W. The 'general' score puts the "
            "learned matrix between them: q · (h_j W).",
            impl=_luong_variant(use_w=False),
        ),
        Mistake(
            "scaled_like_a_transformer",
            "The scores are divided by √U. Luong's scores are not scaled (the 1/√d of "
            "Transformer attention came later).",
            impl=_luong_variant(scale=True),
        ),
        Mistake(
            "w_transposed",
            "W is applied transposed. It has shape (M, U): it maps a memory vector (M) into the "
            "query's space (U), `memory @ w`.",
            impl=_luong_variant(transpose=True),
        ),
        Mistake(
            "softmax_applied",
            "These are attention weights: the question asks for the scores, before the softmax.",
            impl=_luong_variant(softmax=True),
        ),
    ),
    hints=(
        "Bring the memory into the query's space first: `memory @ w` is (B, S, U).",
        "Then one dot product per source position: an einsum 'bu,bsu->bs'.",
        "`return ops.einsum('bu,bsu->bs', query, memory @ w)`.",
    ),
)


# ---------------------------------------------------------------------------
# context_vector
# ---------------------------------------------------------------------------
def _context(scores, memory, mask, *, use_mask=True, renormalise=True, empty="zeros", axis=-1):
    s = np.asarray(scores, np.float64)
    h = np.asarray(memory, np.float64)
    m = np.asarray(mask, bool)
    if not use_mask:
        weights = _softmax(s, axis=axis)
    elif not renormalise:
        weights = _softmax(s, axis=axis) * m
    else:
        weights = _softmax(np.where(m, s, -1e30), axis=axis)
        if empty == "zeros":
            weights = weights * m
    return np.einsum("bs,bsm->bm", weights, h)


def context_vector(scores, memory, mask):
    """Reference: ``softmax`` of the scores over the real source positions, then ``Σ_j α_j h_j``; ``(B, M)``.

    A row whose mask is all ``False`` gets a zero context vector.
    """
    return _context(scores, memory, mask)


def _context_cases(rng):
    cases = []
    for b, s, m, empty in ((3, _int(rng, 4, 6), 4, False), (2, _int(rng, 3, 5), 3, True), (4, 5, 2, False)):
        scores = (2.0 * rng.standard_normal((b, s))).astype(np.float32)
        memory = rng.standard_normal((b, s, m)).astype(np.float32)
        lengths = rng.integers(1, s + 1, size=b)
        lengths[0] = _int(rng, 1, s - 1)  # at least one padded row
        if empty:
            lengths[-1] = 0  # a row with no real source token
        mask = np.arange(s)[None, :] < lengths[:, None]
        cases.append(Case((scores, memory, mask), {},
                          f"scores {scores.shape}, memory {memory.shape}, mask={format_value(mask)}"))
    return cases


def _has_empty_row(case):
    return bool((~np.asarray(case.args[2]).any(axis=-1)).any())


def _context_variant(**switches):
    def impl(scores, memory, mask):
        return _context(scores, memory, mask, **switches)

    return impl


CONTEXT_VECTOR = Question(
    name="context_vector",
    signature="context_vector(scores, memory, mask)",
    points=2,
    summary="(B, M): the attention-weighted average of the memory over the real source positions.",
    reference=context_vector,
    cases=_context_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "mask_ignored",
            "The padded source positions got weight too. Set their scores to a large negative "
            "number before the softmax (ops.where(mask, scores, -1e30)).",
            impl=_context_variant(use_mask=False),
        ),
        Mistake(
            "masked_after_softmax",
            "The weights were masked after the softmax, so they no longer sum to 1 over the real "
            "positions. Mask the scores before the softmax.",
            impl=_context_variant(renormalise=False),
        ),
        Mistake(
            "empty_row_uniform",
            "A row with no real source token gets the plain average of the memory (a softmax of "
            "equal -1e30 scores is uniform). Its context vector must be zero: multiply the "
            "weights by the mask after the softmax.",
            impl=_context_variant(empty="uniform"),
            applies=_has_empty_row,
        ),
        Mistake(
            "softmax_over_batch",
            "The softmax runs over the batch axis. Each row's weights are a distribution over "
            "its source positions: softmax over the last axis.",
            impl=_context_variant(axis=0),
        ),
    ),
    hints=(
        "Two steps: attention weights from the scores (masked softmax), then a weighted sum of "
        "the memory.",
        "`weights = ops.softmax(ops.where(mask, scores, -1e30), axis=-1) * mask` gives zeros for "
        "a row without real tokens.",
        "`return ops.einsum('bs,bsm->bm', weights, memory)`.",
    ),
)


EXERCISE_SET = ExerciseSet(
    id="06_rnn_decoders",
    title="RNN decoders",
    questions=(BAHDANAU_SCORES, LUONG_GENERAL_SCORES, CONTEXT_VECTOR),
)
