"""Exercise set 07: the Transformer decoder block and the leakage audit.

========================= ========================================================= ======
function                  returns                                                   points
========================= ========================================================= ======
``residual_sublayer``     float ``(B, T, C)``: a pre-norm or post-norm sublayer      2
``max_future_influence``  float ``(N,)``: the audit's largest forbidden change       2
``count_decoder_params``  int ``(4,)``: parameters of one decoder block, by part     1
========================= ========================================================= ======

NumPy only: the grader never imports Keras.
"""

import numpy as np

from ..spec import Case, ExerciseSet, Mistake, Output, Question, format_value
from ._common import randint as _int

EPSILON = 1e-5  # the blocks' layer-norm epsilon (Keras's LayerNormalization defaults to 1e-3)


# ---------------------------------------------------------------------------
# residual_sublayer
# ---------------------------------------------------------------------------
def _layer_norm(x, gamma, beta, *, axis=-1, eps=EPSILON, affine=True):
    mean = x.mean(axis=axis, keepdims=True)
    var = x.var(axis=axis, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    return y * gamma + beta if affine else y


def _sublayer(x, w, b, gamma, beta, norm_first=True, *, residual=True, swap=False, **norm):
    x = np.asarray(x, np.float64)
    pre = bool(norm_first) != swap
    ln = lambda h: _layer_norm(h, gamma, beta, **norm)  # noqa: E731
    f = lambda h: h @ w + b  # noqa: E731
    if pre:
        y = f(ln(x))
        return x + y if residual else y
    return ln(x + f(x)) if residual else ln(f(x))


def residual_sublayer(x, w, b, gamma, beta, norm_first=True):
    """Reference: ``x + f(LN(x))`` (pre-norm) or ``LN(x + f(x))`` (post-norm); ``f(h) = h @ w + b``.

    ``LN`` normalises each position's ``C`` features (epsilon 1e-5, inside the square root),
    then scales by ``gamma`` and shifts by ``beta``.
    """
    return _sublayer(x, w, b, gamma, beta, norm_first)


def _sublayer_cases(rng):
    cases = []
    for norm_first, scale in ((None, 1.5), (False, 1.5), (True, 0.05), (False, 0.05)):
        b_, t, c = 2, _int(rng, 3, 5), _int(rng, 4, 6)
        x = (scale * rng.standard_normal((b_, t, c)) + 0.3).astype(np.float32)
        w = (rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32)
        b = (0.2 * rng.standard_normal(c)).astype(np.float32)
        gamma = (1.0 + 0.3 * rng.standard_normal(c)).astype(np.float32)
        beta = (0.3 * rng.standard_normal(c)).astype(np.float32)
        kwargs = {} if norm_first is None else {"norm_first": norm_first}
        label = f"x {x.shape} (scale {scale}), " + ("norm_first omitted (True)" if norm_first is None
                                                     else f"norm_first={norm_first}")
        cases.append(Case((x, w, b, gamma, beta), kwargs, label))
    return cases


def _sublayer_variant(**switches):
    def impl(x, w, b, gamma, beta, norm_first=True):
        return _sublayer(x, w, b, gamma, beta, norm_first, **switches)

    return impl


RESIDUAL_SUBLAYER = Question(
    name="residual_sublayer",
    signature="residual_sublayer(x, w, b, gamma, beta, norm_first=True)",
    points=2,
    summary="(B, T, C): x + f(LN(x)) when norm_first, else LN(x + f(x)), with f(h) = h @ w + b.",
    reference=residual_sublayer,
    cases=_sublayer_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "pre_and_post_swapped",
            "Pre-norm and post-norm are the wrong way round. Pre-norm (norm_first=True) "
            "normalises the sublayer's *input* and adds to the untouched x: x + f(LN(x)). "
            "Post-norm normalises the *sum*: LN(x + f(x)).",
            impl=_sublayer_variant(swap=True),
        ),
        Mistake(
            "no_residual",
            "The residual connection is missing: the sublayer's result replaces x instead of "
            "being added to it (x + f(LN(x)), LN(x + f(x))).",
            impl=_sublayer_variant(residual=False),
        ),
        Mistake(
            "norm_over_wrong_axis",
            "The layer norm normalises over the positions (axis 1). It normalises each "
            "position's C features: mean and variance over the last axis.",
            impl=_sublayer_variant(axis=1),
        ),
        Mistake(
            "no_scale_and_shift",
            "The layer norm leaves out gamma and beta. After normalising, multiply by gamma "
            "and add beta.",
            impl=_sublayer_variant(affine=False),
        ),
        Mistake(
            "keras_default_epsilon",
            "The layer norm uses epsilon 1e-3 (the default of keras.layers.LayerNormalization). "
            "The blocks use 1e-5, as PyTorch and KerasHub do; it matters when the features "
            "have a small variance.",
            impl=_sublayer_variant(eps=1e-3),
        ),
    ),
    hints=(
        "Write a layer_norm(h) over the last axis first; then the two variants are one line each.",
        "`mean = ops.mean(h, -1, keepdims=True)`, `var = ops.var(h, -1, keepdims=True)`, "
        "`(h - mean) / ops.sqrt(var + 1e-5) * gamma + beta`.",
        "`if norm_first: return x + f(layer_norm(x))`, else `return layer_norm(x + f(x))`, "
        "with `f = lambda h: ops.matmul(h, w) + b`.",
    ),
)


# ---------------------------------------------------------------------------
# max_future_influence
# ---------------------------------------------------------------------------
def _influence(base, changed, positions, real, *, side="past", signed=False, use_real=True):
    base, changed = np.asarray(base, np.float64), np.asarray(changed, np.float64)
    real = np.asarray(real, bool)
    t = np.arange(base.shape[1])
    result = np.zeros(len(positions))
    for i, p in enumerate(np.asarray(positions)):
        diff = changed[i] - base
        diff = diff if signed else np.abs(diff)
        if side == "past":
            keep = t <= p
        elif side == "strict":
            keep = t < p
        else:
            keep = t > p
        keep = keep[None, :] & real if use_real else np.broadcast_to(keep[None, :], real.shape)
        values = diff[keep]  # (n, V)
        result[i] = max(0.0, float(values.max())) if values.size else 0.0
    return result


def max_future_influence(base, changed, positions, real):
    """Reference: for each ``i``, the largest ``|changed[i] - base|`` at real positions ``t <= positions[i]``.

    ``base`` ``(B, T, V)``: the outputs on the original tokens. ``changed`` ``(N, B, T, V)``:
    the outputs after the tokens *after* ``positions[i]`` were replaced. ``real`` bool
    ``(B, T)``: ``True`` at real (non-pad) positions, the only ones compared. 0 where nothing
    may be compared.
    """
    return _influence(base, changed, positions, real)


def _influence_cases(rng):
    cases = []
    for _ in range(3):
        b, t, v = 2, _int(rng, 6, 7), 3
        base = rng.standard_normal((b, t, v)).astype(np.float32)
        lengths = np.array([t, _int(rng, 2, 3)])  # row 1 is padded from lengths[1] on
        real = np.arange(t)[None, :] < lengths[:, None]
        positions = np.array([_int(rng, 0, 1), _int(rng, 3, t - 3), t - 2])
        changed = np.repeat(base[None], len(positions), axis=0)
        for i, p in enumerate(positions):
            changed[i, :, p + 1:] += 5.0 * rng.standard_normal((b, t - p - 1, v))  # the future: allowed
        # Position 0: no leak (a correct model). Middle: a negative leak at exactly p, a smaller
        # positive one before it, and a bigger one under the padding of row 1. Last: a leak two back.
        p = positions[1]
        changed[1, 0, p, 0] -= 2.0
        changed[1, 0, p - 1, 1] += 0.5
        changed[1, 1, lengths[1], 2] += 3.0
        changed[2, 0, positions[2] - 2, 1] -= 1.0
        cases.append(Case((base, changed.astype(np.float32), positions, real), {},
                          f"base {base.shape}, changed {changed.shape}, positions={format_value(positions)}, "
                          f"real rows of lengths {format_value(lengths)}"))
    return cases


def _influence_variant(**switches):
    def impl(base, changed, positions, real):
        return _influence(base, changed, positions, real, **switches)

    return impl


MAX_FUTURE_INFLUENCE = Question(
    name="max_future_influence",
    signature="max_future_influence(base, changed, positions, real)",
    points=2,
    summary="float (N,): the largest change at real positions <= positions[i] after the future was changed.",
    reference=max_future_influence,
    cases=_influence_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "position_itself_skipped",
            "Only positions strictly before p are compared. The output at p itself must not "
            "depend on tokens after p either: compare t <= p.",
            impl=_influence_variant(side="strict"),
        ),
        Mistake(
            "compared_the_future",
            "You compared the positions after p. Those are the ones that *may* change (their "
            "inputs changed); a leak shows at t <= p.",
            impl=_influence_variant(side="future"),
        ),
        Mistake(
            "signed_change",
            "You took the largest signed change. A leak can push an output down as well as "
            "up: take the absolute value.",
            impl=_influence_variant(signed=True),
        ),
        Mistake(
            "padding_compared",
            "Padded positions were compared too. Outputs at padded queries are computed but "
            "dropped by the loss mask; compare real positions only.",
            impl=_influence_variant(use_real=False),
        ),
    ),
    hints=(
        "Loop over i: `diff = abs(changed[i] - base)` is (B, T, V); keep the positions t <= "
        "positions[i] that are real.",
        "`keep = (np.arange(T)[None, :] <= p) & real` is (B, T); `diff[keep]` is (n, V).",
        "`result[i] = diff[keep].max() if diff[keep].size else 0.0`.",
    ),
)


# ---------------------------------------------------------------------------
# count_decoder_params
# ---------------------------------------------------------------------------
def _count(dim, ff_dim, cross_attention, *, biases=True, projections=4, norm_vectors=2,
           cross_norm=True):
    c, f = int(dim), int(ff_dim)
    attention = projections * (c * c + (c if biases else 0))
    cross = attention if cross_attention else 0
    ffn = 2 * c * f + ((f + c) if biases else 0)
    norms = (2 + (1 if cross_attention and cross_norm else 0)) * norm_vectors * c
    return np.array([attention, cross, ffn, norms], dtype=np.int64)


def count_decoder_params(dim, ff_dim, cross_attention):
    """Reference: int ``(4,)``: ``[self_attention, cross_attention, feed_forward, layer_norms]``.

    One pre-norm decoder block of width ``dim``: attention with biased ``Q, K, V, O``
    projections, a biased two-layer feed-forward network, one layer norm (``gamma``, ``beta``)
    per sublayer. ``cross_attention=False``: no cross-attention and no norm for it.
    """
    return _count(dim, ff_dim, cross_attention)


def _count_cases(rng):
    cases = []
    for cross in (True, False, True):
        c = int(rng.choice([16, 32, 64, 96]))
        f = int(rng.choice([2, 4])) * c
        cases.append(Case((c, f, cross), {}, f"dim={c}, ff_dim={f}, cross_attention={cross}"))
    return cases


def _count_variant(**switches):
    def impl(dim, ff_dim, cross_attention):
        return _count(dim, ff_dim, cross_attention, **switches)

    return impl


COUNT_DECODER_PARAMS = Question(
    name="count_decoder_params",
    signature="count_decoder_params(dim, ff_dim, cross_attention)",
    points=1,
    summary="int (4,): [self_attention, cross_attention, feed_forward, layer_norms] parameter counts.",
    reference=count_decoder_params,
    cases=_count_cases,
    output=Output("int"),
    mistakes=(
        Mistake(
            "no_biases",
            "The biases are not counted. Each projection (Q, K, V, O) has a bias of size C; "
            "the feed-forward layers have biases of sizes ff_dim and C.",
            impl=_count_variant(biases=False),
        ),
        Mistake(
            "no_output_projection",
            "An attention has four projections: W^Q, W^K, W^V **and** the output projection W^O.",
            impl=_count_variant(projections=3),
        ),
        Mistake(
            "norm_without_beta",
            "A layer norm has two vectors of size C: the scale gamma and the shift beta.",
            impl=_count_variant(norm_vectors=1),
        ),
        Mistake(
            "cross_attention_without_norm",
            "With cross-attention the block has three residual sublayers, so three layer norms.",
            impl=_count_variant(cross_norm=False),
            applies=lambda case: bool(case.args[2]),
        ),
    ),
    hints=(
        "The number of heads does not matter: H heads of size C/H have the same C x C projections.",
        "Attention: 4 * (C*C + C). Feed-forward: C*F + F + F*C + C. A layer norm: 2*C.",
        "`np.array([4*(C*C + C), 4*(C*C + C) if cross_attention else 0, 2*C*F + F + C, "
        "(3 if cross_attention else 2) * 2 * C])`.",
    ),
)


EXERCISE_SET = ExerciseSet(
    id="07_transformer_decoder",
    title="The Transformer decoder",
    questions=(RESIDUAL_SUBLAYER, MAX_FUTURE_INFLUENCE, COUNT_DECODER_PARAMS),
)
