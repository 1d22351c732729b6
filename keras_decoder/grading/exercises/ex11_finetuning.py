"""Exercise set 11: fine-tuning.

========================= ============================================== ======
function                  returns                                        points
========================= ============================================== ======
``prompt_loss_mask``      float ``(B, T)``: 1.0 on response positions       2
``lora_trainable_params`` int ``(N,)``: LoRA's weights for each kernel       1
``lora_dense``            float ``(B, out)``: a Dense layer with LoRA        2
========================= ============================================== ======

NumPy only: the grader never imports Keras.
"""

import numpy as np

from ..spec import Case, ExerciseSet, Mistake, Output, Question
from ._common import label as _label, randint as _int


# ---------------------------------------------------------------------------
# prompt_loss_mask
# ---------------------------------------------------------------------------
def prompt_loss_mask(prompt_lengths, total_len):
    """Reference: ``1.0`` at position ``t`` of row ``b`` iff ``t >= prompt_lengths[b]``; float ``(B, T)``."""
    lengths = np.asarray(prompt_lengths)
    return (np.arange(total_len)[None, :] >= lengths[:, None]).astype(np.float32)


def _mask_cases(rng):
    cases = []
    for b, t in ((3, _int(rng, 5, 8)), (4, 6), (2, _int(rng, 3, 4))):
        lengths = rng.integers(1, t, size=b).astype(np.int32)
        cases.append(Case((lengths, t), {}, _label(prompt_lengths=lengths, total_len=t)))
    t = _int(rng, 4, 6)
    lengths = np.array([0, t, _int(rng, 1, t - 1)], np.int32)  # no prompt; all prompt
    cases.append(Case((lengths, t), {}, _label(prompt_lengths=lengths, total_len=t)))
    return cases


PROMPT_LOSS_MASK = Question(
    name="prompt_loss_mask",
    signature="prompt_loss_mask(prompt_lengths, total_len)",
    points=2,
    summary="float (B, T): 1.0 where a token belongs to the response (t >= prompt length), 0.0 in the prompt.",
    reference=prompt_loss_mask,
    cases=_mask_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "first_response_token_dropped",
            "Position t = prompt_length got 0: that is the first token of the response, and it "
            "counts. Use t >= prompt_length, not t > prompt_length.",
            impl=lambda prompt_lengths, total_len: (
                np.arange(total_len)[None, :] > np.asarray(prompt_lengths)[:, None]).astype(np.float32),
        ),
        Mistake(
            "prompt_counted_instead",
            "The mask is 1 on the prompt and 0 on the response: inverted. The model is trained "
            "to produce the response, so the response counts.",
            impl=lambda prompt_lengths, total_len: (
                np.arange(total_len)[None, :] < np.asarray(prompt_lengths)[:, None]).astype(np.float32),
        ),
        Mistake(
            "bool_not_float",
            "The values are right but the mask is boolean. A loss mask is a float sample weight "
            "(1.0 = this label counts): cast it to float32.",
            impl=lambda prompt_lengths, total_len: (
                np.arange(total_len)[None, :] >= np.asarray(prompt_lengths)[:, None]),
        ),
    ),
    hints=(
        "Compare every position 0 .. T-1 with each row's prompt length.",
        "`positions = ops.arange(total_len)[None, :]` broadcasts against `prompt_lengths[:, None]`.",
        "`return ops.cast(positions >= prompt_lengths[:, None], 'float32')`.",
    ),
)


# ---------------------------------------------------------------------------
# lora_trainable_params
# ---------------------------------------------------------------------------
def lora_trainable_params(in_dims, out_dims, rank):
    """Reference: ``rank * (in + out)`` per kernel: ``A`` is ``(in, rank)``, ``B`` ``(rank, out)``."""
    return rank * (np.asarray(in_dims, np.int64) + np.asarray(out_dims, np.int64))


def _count_cases(rng):
    cases = []
    for _ in range(3):
        n = _int(rng, 2, 4)
        ins = rng.choice([64, 128, 256, 512], size=n).astype(np.int64)
        outs = rng.choice([64, 128, 384, 1024], size=n).astype(np.int64)
        rank = int(rng.choice([2, 4, 8, 16]))
        cases.append(Case((ins, outs, rank), {}, _label(in_dims=ins, out_dims=outs, rank=rank)))
    return cases


LORA_TRAINABLE_PARAMS = Question(
    name="lora_trainable_params",
    signature="lora_trainable_params(in_dims, out_dims, rank)",
    points=1,
    summary="int (N,): the trainable weights LoRA adds to each (in, out) kernel.",
    reference=lora_trainable_params,
    cases=_count_cases,
    output=Output("int"),
    mistakes=(
        Mistake(
            "full_rank_update",
            "rank * in * out counts a full matrix per rank. LoRA's update is A @ B with A "
            "(in, rank) and B (rank, out): rank * (in + out) weights.",
            impl=lambda in_dims, out_dims, rank: rank * np.asarray(in_dims, np.int64) * np.asarray(out_dims, np.int64),
        ),
        Mistake(
            "frozen_kernel_counted",
            "The frozen kernel (in * out) was counted. Only A and B train.",
            impl=lambda in_dims, out_dims, rank: (
                rank * (np.asarray(in_dims, np.int64) + np.asarray(out_dims, np.int64))
                + np.asarray(in_dims, np.int64) * np.asarray(out_dims, np.int64)),
        ),
        Mistake(
            "one_factor_only",
            "Only one of the two factors was counted. There are two: A (in, rank) and B (rank, out).",
            impl=(lambda in_dims, out_dims, rank: rank * np.asarray(in_dims, np.int64),
                  lambda in_dims, out_dims, rank: rank * np.asarray(out_dims, np.int64)),
        ),
    ),
    hints=(
        "LoRA replaces the update of a kernel W (in, out) by a product of two thin matrices.",
        "A is (in, rank) and B is (rank, out); W itself is frozen.",
        "`return rank * (np.asarray(in_dims) + np.asarray(out_dims))`.",
    ),
)


# ---------------------------------------------------------------------------
# lora_dense
# ---------------------------------------------------------------------------
def lora_dense(x, kernel, bias, lora_a, lora_b, alpha):
    """Reference: ``x @ kernel + bias + (alpha / rank) * (x @ lora_a) @ lora_b``, rank = ``lora_a.shape[1]``."""
    x = np.asarray(x, np.float64)
    rank = np.shape(lora_a)[1]
    return x @ kernel + bias + (alpha / rank) * (x @ lora_a) @ lora_b


def _dense_cases(rng):
    cases = []
    for b, i, o, r, alpha in ((3, 6, 5, 2, 4.0), (2, 8, 4, 4, 8.0), (4, 5, 7, 1, 3.0)):
        x = rng.standard_normal((b, i)).astype(np.float32)
        kernel = (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32)
        bias = (0.1 * rng.standard_normal(o)).astype(np.float32)
        a = rng.standard_normal((i, r)).astype(np.float32)
        bb = rng.standard_normal((r, o)).astype(np.float32)
        cases.append(Case((x, kernel, bias, a, bb, alpha), {},
                          f"x {x.shape}, kernel {kernel.shape}, rank {r}, alpha={alpha}"))
    return cases


LORA_DENSE = Question(
    name="lora_dense",
    signature="lora_dense(x, kernel, bias, lora_a, lora_b, alpha)",
    points=2,
    summary="float (B, out): a Dense layer whose frozen kernel gets LoRA's scaled low-rank update.",
    reference=lora_dense,
    cases=_dense_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "update_not_scaled",
            "The low-rank update is not scaled. LoRA multiplies it by alpha / rank.",
            impl=lambda x, kernel, bias, lora_a, lora_b, alpha: lora_dense(x, kernel, bias, lora_a, lora_b, np.shape(lora_a)[1]),
        ),
        Mistake(
            "scale_inverted",
            "The update is scaled by rank / alpha. The scale is alpha / rank.",
            impl=lambda x, kernel, bias, lora_a, lora_b, alpha: lora_dense(
                x, kernel, bias, lora_a, lora_b, np.shape(lora_a)[1] ** 2 / alpha),
        ),
        Mistake(
            "frozen_path_missing",
            "Only the low-rank path is computed. The frozen kernel and bias still apply: "
            "x @ kernel + bias + the update.",
            impl=lambda x, kernel, bias, lora_a, lora_b, alpha: (
                (alpha / np.shape(lora_a)[1]) * (np.asarray(x, np.float64) @ lora_a) @ lora_b),
        ),
    ),
    hints=(
        "The output is the frozen layer's output plus a low-rank correction.",
        "The correction is (x @ lora_a) @ lora_b: two thin matmuls, never the (in, out) product.",
        "`rank = lora_a.shape[1]`; `return x @ kernel + bias + (alpha / rank) * (x @ lora_a) @ lora_b`.",
    ),
)


EXERCISE_SET = ExerciseSet(
    id="11_finetuning",
    title="Fine-tuning",
    questions=(PROMPT_LOSS_MASK, LORA_TRAINABLE_PARAMS, LORA_DENSE),
)
