"""Exercise set 00: backends and Keras masking.

============================== ============================================ ======
function                       returns                                      points
============================== ============================================ ======
``stable_softmax``             float, softmax over the last axis            2
``masked_mean``                float ``(B, D)``: mean over real positions    2
``mask_after_prepend``         bool ``(B, P + T)``: a layer's compute_mask  1
============================== ============================================ ======

NumPy only: the grader never imports Keras.
"""

import numpy as np

from ..spec import Case, ExerciseSet, Mistake, Output, Question
from ._common import label as _label, randint as _int, lengths_mask as _lengths_mask


# ---------------------------------------------------------------------------
# stable_softmax
# ---------------------------------------------------------------------------
def stable_softmax(x):
    """Reference: softmax over the last axis, computed without overflow."""
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_cases(rng):
    cases = []
    # 1. Ordinary scores, (B, T) with B != T.
    x = (2.0 * rng.standard_normal((3, _int(rng, 4, 6)))).astype(np.float32)
    cases.append(Case((x,), {}, _label(x=x)))
    # 2. Huge scores in one row and very negative ones in another: exp overflows
    #    without the shift, and a shift by the *global* maximum underflows.
    x = rng.standard_normal((3, 4)).astype(np.float32)
    x[0] += 1000.0
    x[1] -= 1000.0
    cases.append(Case((x,), {}, _label(x=x)))
    # 3. Rank 3: the softmax is over the last axis only.
    x = rng.standard_normal((2, 3, _int(rng, 4, 5))).astype(np.float32)
    cases.append(Case((x,), {}, f"x of shape {x.shape}"))
    return cases


def _naive_softmax(x):
    x = np.asarray(x, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True)


def _global_max_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    with np.errstate(invalid="ignore"):
        return e / e.sum(axis=-1, keepdims=True)


STABLE_SOFTMAX = Question(
    name="stable_softmax",
    signature="stable_softmax(x)",
    points=2,
    summary="softmax over the last axis of x, without overflow: each row sums to 1.",
    reference=stable_softmax,
    cases=_softmax_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "no_max_subtraction",
            "exp(x) overflows for large scores (exp(1000) is inf, and inf / inf is NaN). "
            "Subtract each row's maximum first: softmax(x) = softmax(x - max(x)).",
            impl=_naive_softmax,
        ),
        Mistake(
            "global_max",
            "You subtract the maximum of the whole array, not of each row. A row far below "
            "the global maximum then underflows to exp(-2000) = 0 everywhere, and 0 / 0 is NaN. "
            "Use `ops.max(x, axis=-1, keepdims=True)`.",
            impl=_global_max_softmax,
        ),
        Mistake(
            "wrong_axis",
            "The softmax runs over the first axis. Attention normalises over the keys, the "
            "last axis: use axis=-1 for both the max and the sum.",
            impl=lambda x: np.moveaxis(stable_softmax(np.moveaxis(np.asarray(x), 0, -1)), -1, 0),
        ),
        Mistake(
            "normalised_over_everything",
            "You divide by the sum of the whole array, so all entries together sum to 1. "
            "Each row must sum to 1: `ops.sum(e, axis=-1, keepdims=True)`.",
            impl=lambda x: (lambda e: e / e.sum())(
                np.exp(np.asarray(x, np.float64) - np.asarray(x, np.float64).max(axis=-1, keepdims=True))
            ),
        ),
    ),
    hints=(
        "softmax(x) does not change if you subtract the same number from every entry of a row.",
        "Subtract the row maximum (`ops.max(x, axis=-1, keepdims=True)`), exponentiate, then "
        "divide by the row sum (`ops.sum(e, axis=-1, keepdims=True)`).",
        "`x = ops.convert_to_tensor(x); e = ops.exp(x - ops.max(x, axis=-1, keepdims=True)); "
        "return e / ops.sum(e, axis=-1, keepdims=True)`.",
    ),
)


# ---------------------------------------------------------------------------
# masked_mean
# ---------------------------------------------------------------------------
def masked_mean(x, mask):
    """Reference: mean over the real positions of each row, ``(B, D)``; 0 for a row with none."""
    x = np.asarray(x, np.float64)
    m = np.asarray(mask, bool)[..., None].astype(np.float64)  # (B, T, 1)
    count = m.sum(axis=1)  # (B, 1)
    total = (x * m).sum(axis=1)  # (B, D)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def _mean_cases(rng):
    cases = []
    # 1. Right padding, every row has a real token.
    b, t, d = 3, _int(rng, 4, 6), _int(rng, 2, 4)
    lengths = rng.integers(1, t + 1, size=b)
    lengths[0], lengths[1] = t, _int(rng, 1, t - 1)
    x = rng.standard_normal((b, t, d)).astype(np.float32) + 1.0  # padding holds non-zero vectors
    mask = _lengths_mask(rng.permutation(lengths), t)
    cases.append(Case((x, mask), {}, _label(mask=mask) + f", x of shape {x.shape}"))
    # 2. A row with no real token at all (a batch filler).
    b, t, d = 3, _int(rng, 3, 5), 2
    mask = _lengths_mask(rng.integers(1, t + 1, size=b), t)
    mask[_int(rng, 0, b - 1)] = False
    x = rng.standard_normal((b, t, d)).astype(np.float32) + 1.0
    cases.append(Case((x, mask), {}, _label(mask=mask) + f", x of shape {x.shape}"))
    # 3. Left padding.
    b, t, d = 2, _int(rng, 4, 6), 3
    mask = _lengths_mask([t, _int(rng, 1, t - 1)], t)[:, ::-1].copy()
    x = rng.standard_normal((b, t, d)).astype(np.float32) + 1.0
    cases.append(Case((x, mask), {}, _label(mask=mask) + f", x of shape {x.shape}"))
    return cases


def _has_empty_row(case):
    return not np.asarray(case.args[1]).any(axis=1).all()


def _mean_nan(x, mask):
    x = np.asarray(x, np.float64)
    m = np.asarray(mask, bool)[..., None].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * m).sum(axis=1) / m.sum(axis=1)


MASKED_MEAN = Question(
    name="masked_mean",
    signature="masked_mean(x, mask)",
    points=2,
    summary="(B, D): the mean of x over the positions where mask is True; 0 for a row with none.",
    reference=masked_mean,
    cases=_mean_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "ignores_mask",
            "The mean includes the padded positions. Multiply x by the mask before summing, "
            "and divide by the number of real positions.",
            impl=lambda x, mask: np.asarray(x, np.float64).mean(axis=1),
        ),
        Mistake(
            "divides_by_length",
            "The padded positions are left out of the sum, but you divide by the full length "
            "T. Divide by the number of real positions, `ops.sum(mask, axis=1)`.",
            impl=lambda x, mask: (np.asarray(x, np.float64) * np.asarray(mask, bool)[..., None]).sum(axis=1)
            / np.shape(x)[1],
        ),
        Mistake(
            "nan_on_empty_row",
            "A row with no real token gives 0 / 0 = NaN. Divide by `maximum(count, 1)`, so such "
            "a row gives 0 (its sum is 0).",
            impl=_mean_nan,
            applies=_has_empty_row,
        ),
        Mistake(
            "inverted_mask",
            "You average the padded positions instead of the real ones: True means a real token.",
            impl=lambda x, mask: masked_mean(x, ~np.asarray(mask, bool)),
        ),
    ),
    hints=(
        "A mean is a sum divided by a count; only the real positions count.",
        "Cast the mask to float with a feature axis, `m = ops.cast(mask, 'float32')[:, :, None]`; "
        "the sum is `ops.sum(x * m, axis=1)`, the count `ops.sum(m, axis=1)`.",
        "`return ops.sum(x * m, axis=1) / ops.maximum(ops.sum(m, axis=1), 1.0)`.",
    ),
)


# ---------------------------------------------------------------------------
# mask_after_prepend
# ---------------------------------------------------------------------------
def mask_after_prepend(mask, num_prefix):
    """Reference: ``num_prefix`` True columns, then ``mask``: bool ``(B, P + T)``."""
    mask = np.asarray(mask, bool)
    return np.concatenate([np.ones((mask.shape[0], num_prefix), bool), mask], axis=1)


def _prepend_cases(rng):
    cases = []
    for b, t, p in ((_int(rng, 2, 3), _int(rng, 4, 6), _int(rng, 1, 3)), (1, _int(rng, 3, 5), 2),
                    (_int(rng, 2, 4), _int(rng, 3, 5), 1)):
        lengths = rng.integers(1, t, size=b)  # every row padded
        mask = _lengths_mask(lengths, t)
        cases.append(Case((mask, p), {}, _label(mask=mask, num_prefix=p)))
    return cases


MASK_AFTER_PREPEND = Question(
    name="mask_after_prepend",
    signature="mask_after_prepend(mask, num_prefix)",
    points=1,
    summary="bool (B, P + T): what compute_mask returns for a layer that prepends P real positions.",
    reference=mask_after_prepend,
    cases=_prepend_cases,
    output=Output("bool"),
    mistakes=(
        Mistake(
            "prefix_appended",
            "The prefix columns are at the end. The layer *prepends* the prefix: its columns "
            "come first, then the token mask.",
            impl=lambda mask, num_prefix: np.concatenate(
                [np.asarray(mask, bool), np.ones((np.shape(mask)[0], num_prefix), bool)], axis=1),
        ),
        Mistake(
            "prefix_masked",
            "The prefix positions are False, so nothing may attend to them. They are real "
            "positions (the conditioning): True.",
            impl=lambda mask, num_prefix: np.concatenate(
                [np.zeros((np.shape(mask)[0], num_prefix), bool), np.asarray(mask, bool)], axis=1),
        ),
        Mistake(
            "mask_unchanged",
            "The mask is returned unchanged, (B, T), but the output has P + T positions. A layer "
            "that changes the length must change the mask with it; this is why it needs "
            "`compute_mask`.",
            impl=lambda mask, num_prefix: np.asarray(mask, bool),
        ),
        Mistake(
            "not_boolean",
            "The values are right but the mask is numeric. Keras masks are bool.",
            impl=lambda mask, num_prefix: mask_after_prepend(mask, num_prefix).astype(np.int32),
        ),
    ),
    hints=(
        "The output has P more positions than the input, all at the front, and all real.",
        "Make a (B, P) block of True, e.g. `ops.ones((B, num_prefix), dtype='bool')`, and "
        "concatenate it in front of the mask along axis 1.",
        "`B = ops.shape(mask)[0]; return ops.concatenate([ops.ones((B, num_prefix), 'bool'), "
        "ops.cast(mask, 'bool')], axis=1)`.",
    ),
)


EXERCISE_SET = ExerciseSet(
    id="00_backends_and_keras_masking",
    title="Backends and Keras masking",
    questions=(STABLE_SOFTMAX, MASKED_MEAN, MASK_AFTER_PREPEND),
)
