"""Exercise set 08: training a translator.

========================= ============================================== ======
function                  returns                                        points
========================= ============================================== ======
``masked_cross_entropy``  float ``(B,)``: each row's loss over real labels   2
``masked_token_accuracy`` float ``(B,)``: each row's accuracy, padding out   1
``exact_match``           bool ``(B,)``: the whole translation is right      2
========================= ============================================== ======

NumPy only: the grader never imports Keras.
"""

import numpy as np

from ..spec import Case, ExerciseSet, Mistake, Output, Question, format_value
from ._common import label as _label, randint as _int


def _log_softmax(logits, axis=-1):
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _picked(values, labels):
    """``values[b, t, labels[b, t]]``: ``(B, T)``."""
    return np.take_along_axis(values, np.asarray(labels)[..., None].astype(np.int64), axis=-1)[..., 0]


# ---------------------------------------------------------------------------
# masked_cross_entropy
# ---------------------------------------------------------------------------
def masked_cross_entropy(labels, logits, sample_weight):
    """Reference: per row, ``sum_t w * CE_t / sum_t w`` with ``CE_t = -log softmax(logits)[label]``.

    ``labels`` int ``(B, T)``, ``logits`` float ``(B, T, V)``, ``sample_weight`` float
    ``(B, T)`` (1 on real labels, 0 on padding; every row has a real label).
    """
    ce = -_picked(_log_softmax(logits), labels)  # (B, T)
    w = np.asarray(sample_weight, np.float64)
    return (w * ce).sum(axis=1) / w.sum(axis=1)


def _weights(rng, b, t, full_row=True):
    lengths = rng.integers(1, t, size=b)  # at least one padded label
    if full_row:
        lengths[_int(rng, 0, b - 1)] = t  # ... except one full row
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


def _ce_cases(rng):
    cases = []
    for b, t, v in ((3, _int(rng, 4, 6), 7), (2, 5, _int(rng, 4, 9)), (4, 3, 5)):
        w = _weights(rng, b, t)
        labels = rng.integers(1, v, size=(b, t)).astype(np.int32)
        labels[w == 0] = 0  # padded labels are the pad id 0
        logits = (2.0 * rng.standard_normal((b, t, v))).astype(np.float32)
        cases.append(Case((labels, logits, w), {}, f"labels {labels.shape}, logits {logits.shape}, "
                                                   f"sample_weight={format_value(w)}"))
    return cases


def _ce_all_positions(labels, logits, sample_weight):
    return (-_picked(_log_softmax(logits), labels)).mean(axis=1)


def _ce_divided_by_length(labels, logits, sample_weight):
    w = np.asarray(sample_weight, np.float64)
    return (w * -_picked(_log_softmax(logits), labels)).sum(axis=1) / w.shape[1]


def _ce_raw_logits(labels, logits, sample_weight):
    w = np.asarray(sample_weight, np.float64)
    return (w * -_picked(np.asarray(logits, np.float64), labels)).sum(axis=1) / w.sum(axis=1)


def _ce_softmax_over_time(labels, logits, sample_weight):
    w = np.asarray(sample_weight, np.float64)
    return (w * -_picked(_log_softmax(logits, axis=1), labels)).sum(axis=1) / w.sum(axis=1)


MASKED_CROSS_ENTROPY = Question(
    name="masked_cross_entropy",
    signature="masked_cross_entropy(labels, logits, sample_weight)",
    points=2,
    summary="float (B,): each row's cross-entropy averaged over its real (weighted) labels.",
    reference=masked_cross_entropy,
    cases=_ce_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "padding_counted",
            "The loss is averaged over every position, padding included. Multiply each token's "
            "loss by sample_weight and divide by the sum of the weights.",
            impl=_ce_all_positions,
        ),
        Mistake(
            "divided_by_length",
            "The weighted sum is divided by T, the padded length. Divide by the number of real "
            "labels (the sum of the weights), as Keras's reduction 'mean_with_sample_weight' "
            "does; otherwise a row with more padding gets a smaller loss.",
            impl=_ce_divided_by_length,
        ),
        Mistake(
            "logits_not_normalised",
            "The loss is -logits[label]: the logits were used as log-probabilities. Take a "
            "log-softmax over the vocabulary first.",
            impl=_ce_raw_logits,
        ),
        Mistake(
            "softmax_over_time",
            "The log-softmax runs over the time axis. Each position's distribution is over the "
            "vocabulary: the last axis of (B, T, V).",
            impl=_ce_softmax_over_time,
        ),
    ),
    hints=(
        "Three steps: log-probabilities, pick the label's, average with the weights.",
        "`log_probs = ops.log_softmax(logits, axis=-1)`; `ops.take_along_axis(log_probs, labels[..., None], axis=-1)` "
        "picks each label's log-probability.",
        "`ce = -picked[..., 0]`; `return ops.sum(ce * w, axis=1) / ops.sum(w, axis=1)`.",
    ),
)


# ---------------------------------------------------------------------------
# masked_token_accuracy
# ---------------------------------------------------------------------------
def masked_token_accuracy(labels, logits, pad_id=0):
    """Reference: per row, the share of labels ``!= pad_id`` whose argmax prediction is right."""
    labels = np.asarray(labels)
    real = labels != pad_id
    right = (np.asarray(logits).argmax(-1) == labels) & real
    return right.sum(axis=1) / real.sum(axis=1)


def _acc_case(rng, b, t, v, pad_id, zero_is_real=False):
    real = _weights(rng, b, t) > 0
    labels = rng.integers(0 if zero_is_real else 1, v, size=(b, t)).astype(np.int32)
    labels[labels == pad_id] = pad_id + 1 if pad_id + 1 < v else pad_id - 1
    if zero_is_real:
        labels[:, 0] = 0  # 0 is a real token here
    labels[~real] = pad_id
    logits = rng.standard_normal((b, t, v)).astype(np.float32)
    # Make about half of the predictions right, padded positions included.
    right = rng.random((b, t)) < 0.5
    right[~real] = True  # the model "predicts" the padding: must not count
    if zero_is_real:
        right[:, 0] = False  # and misses the real 0 tokens
    rows, cols = np.nonzero(right)
    logits[rows, cols, labels[rows, cols]] += 10.0
    kwargs = {} if pad_id == 0 and not zero_is_real else {"pad_id": pad_id}
    return Case((labels, logits), kwargs, _label(labels=labels, **kwargs) + f", logits {logits.shape}")


def _acc_cases(rng):
    return [
        _acc_case(rng, 3, _int(rng, 4, 6), 6, 0),
        _acc_case(rng, 2, 5, 7, 0),
        _acc_case(rng, 3, _int(rng, 4, 5), 6, _int(rng, 1, 2), zero_is_real=True),
    ]


def _acc_all_positions(labels, logits, pad_id=0):
    return (np.asarray(logits).argmax(-1) == np.asarray(labels)).mean(axis=1)


def _acc_divided_by_length(labels, logits, pad_id=0):
    labels = np.asarray(labels)
    right = (np.asarray(logits).argmax(-1) == labels) & (labels != pad_id)
    return right.sum(axis=1) / labels.shape[1]


def _acc_pad_zero(labels, logits, pad_id=0):
    return masked_token_accuracy(labels, logits, 0)


MASKED_TOKEN_ACCURACY = Question(
    name="masked_token_accuracy",
    signature="masked_token_accuracy(labels, logits, pad_id=0)",
    points=1,
    summary="float (B,): per row, the share of non-padded labels that the argmax predicts.",
    reference=masked_token_accuracy,
    cases=_acc_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "padding_counted",
            "Padded positions are counted: a model that predicts [PAD] on padding scores points "
            "for nothing. Count only labels != pad_id, in the numerator and the denominator.",
            impl=_acc_all_positions,
        ),
        Mistake(
            "divided_by_length",
            "The right predictions are divided by T, the padded length. Divide by the number "
            "of real labels of the row.",
            impl=_acc_divided_by_length,
        ),
        Mistake(
            "pad_id_ignored",
            "Padding was taken to be 0, whatever pad_id says. Use the pad_id argument: here 0 "
            "is a real token.",
            impl=_acc_pad_zero,
            applies=lambda case: case.kwargs.get("pad_id", 0) != 0,
        ),
    ),
    hints=(
        "The prediction at each position is the argmax over the vocabulary (the last axis).",
        "`real = labels != pad_id`; a position counts as right when `real` and the argmax equals the label.",
        "`return ops.sum(right, axis=1) / ops.sum(real, axis=1)` with both cast to float32.",
    ),
)


# ---------------------------------------------------------------------------
# exact_match
# ---------------------------------------------------------------------------
def exact_match(predicted_ids, target_ids, end_id):
    """Reference: row ``b`` is right iff ``predicted[b, :k+1] == target[b, :k+1]``, where
    ``k`` is the position of the first ``end_id`` in ``target[b]`` (every target row has
    one). Whatever the prediction holds after that is ignored."""
    pred, target = np.asarray(predicted_ids), np.asarray(target_ids)
    out = np.zeros(pred.shape[0], bool)
    for b in range(pred.shape[0]):
        k = int(np.flatnonzero(target[b] == end_id)[0])
        out[b] = bool(np.array_equal(pred[b, : k + 1], target[b, : k + 1]))
    return out


def _match_case(rng, end_id):
    b, t = 6, _int(rng, 7, 9)
    target = np.zeros((b, t), np.int32)
    pred = np.zeros((b, t), np.int32)
    kinds = ["garbage_after_end", "no_end", "wrong_token", "copy", "garbage_after_end", "early_end"]
    rng.shuffle(kinds)
    for i, kind in enumerate(kinds):
        k = _int(rng, 2, t - 3)
        target[i, :k] = rng.integers(4, 30, size=k)
        target[i, k] = end_id
        pred[i] = target[i]
        if kind == "garbage_after_end":
            pred[i, k + 1:] = rng.integers(4, 30, size=t - k - 1)
        elif kind == "no_end":  # keeps writing where it should stop
            pred[i, k] = _int(rng, 4, 30)
            pred[i, k + 1:] = rng.integers(4, 30, size=t - k - 1)
        elif kind == "wrong_token":
            j = _int(rng, 0, k - 1)
            pred[i, j] = 4 + (pred[i, j] - 3) % 26
        elif kind == "early_end":
            pred[i, k - 1] = end_id
    return Case((pred, target, end_id), {}, _label(predicted_ids=pred, target_ids=target, end_id=end_id))


def _match_cases(rng):
    return [_match_case(rng, 3), _match_case(rng, _int(rng, 1, 2))]


def _match_whole_row(predicted_ids, target_ids, end_id):
    return np.all(np.asarray(predicted_ids) == np.asarray(target_ids), axis=1)


def _match_end_excluded(predicted_ids, target_ids, end_id):
    pred, target = np.asarray(predicted_ids), np.asarray(target_ids)
    out = np.zeros(pred.shape[0], bool)
    for b in range(pred.shape[0]):
        k = int(np.flatnonzero(target[b] == end_id)[0])
        out[b] = bool(np.array_equal(pred[b, :k], target[b, :k]))
    return out


def _match_whole_batch(predicted_ids, target_ids, end_id):
    right = exact_match(predicted_ids, target_ids, end_id)
    return np.full(right.shape, bool(right.all()))


EXACT_MATCH = Question(
    name="exact_match",
    signature="exact_match(predicted_ids, target_ids, end_id)",
    points=2,
    summary="bool (B,): the prediction equals the target up to and including the target's first [END].",
    reference=exact_match,
    cases=_match_cases,
    output=Output("bool"),
    mistakes=(
        Mistake(
            "whole_row_compared",
            "Whole rows are compared, so what the decoder wrote after [END] counts. Generation "
            "stops at [END]: compare only up to the target's first end_id.",
            impl=_match_whole_row,
        ),
        Mistake(
            "end_not_compared",
            "The tokens before [END] are compared but not [END] itself: a prediction that "
            "goes on writing instead of stopping is accepted. Include position k.",
            impl=_match_end_excluded,
        ),
        Mistake(
            "one_answer_for_the_batch",
            "Every row got the same answer (the whole batch right or wrong). Return one bool "
            "per row: reduce over the time axis only (axis=1).",
            impl=_match_whole_batch,
        ),
    ),
    hints=(
        "Find k, the position of the first end_id in each target row; compare positions 0..k.",
        "`k = ops.min(ops.where(target == end_id, positions, T), axis=1)` with `positions = ops.arange(T)[None, :]`.",
        "`ok = (predicted == target) | (positions > k[:, None])`; `return ops.all(ok, axis=1)`.",
    ),
)


EXERCISE_SET = ExerciseSet(
    id="08_training_translation",
    title="Training a translator",
    questions=(MASKED_CROSS_ENTROPY, MASKED_TOKEN_ACCURACY, EXACT_MATCH),
)
