"""Exercise set 01: decoder inputs.

======================== ================================================ ======
function                 returns                                          points
======================== ================================================ ======
``add_start_end``        int ``(B, T + 2)``: ``[START] tokens [END] pad``  2
``loss_weights``         float ``(B, T)``: 1 for labels that count         1
``greedy_generate``      int ``(steps,)``: free-running greedy decoding    2
======================== ================================================ ======

NumPy only: the grader never imports Keras.
"""

import numpy as np

from ..spec import Case, ExerciseSet, Mistake, Output, Question
from ._common import label as _label, randint as _int, lengths_mask as _lengths_mask


# ---------------------------------------------------------------------------
# add_start_end
# ---------------------------------------------------------------------------
def add_start_end(token_ids, start_id, end_id, pad_id=0):
    """Reference: ``[start] real tokens [end] pad...`` per row, ``(B, T + 2)``.

    ``token_ids`` is right-padded with ``pad_id``: each row's real tokens come first.
    """
    ids = np.asarray(token_ids)
    batch, length = ids.shape
    out = np.full((batch, length + 2), pad_id, ids.dtype)
    for b in range(batch):
        real = ids[b][ids[b] != pad_id]
        out[b, 0] = start_id
        out[b, 1:1 + len(real)] = real
        out[b, 1 + len(real)] = end_id
    return out


def _pack_cases(rng):
    cases = []
    # 1. Default pad id 0, rows of different lengths and one full row.
    b, t = 3, _int(rng, 4, 6)
    lengths = rng.integers(1, t, size=b)
    lengths[_int(rng, 0, b - 1)] = t
    ids = rng.integers(6, 40, size=(b, t)).astype(np.int32)
    ids[~_lengths_mask(lengths, t)] = 0
    cases.append(Case((ids, 2, 3), {}, _label(token_ids=ids, start_id=2, end_id=3)))
    # 2. A non-zero pad id, with 0 used as a real token.
    b, t, pad = 2, _int(rng, 4, 5), _int(rng, 1, 2)
    ids = rng.integers(6, 40, size=(b, t)).astype(np.int32)
    ids[:, 0] = 0
    ids[~_lengths_mask([_int(rng, 2, t - 1), t], t)] = pad
    start, end = _int(rng, 3, 4), 5
    cases.append(Case((ids, start, end), {"pad_id": pad}, _label(token_ids=ids, start_id=start, end_id=end, pad_id=pad)))
    # 3. One padded row.
    t = _int(rng, 3, 5)
    ids = rng.integers(6, 40, size=(1, t)).astype(np.int32)
    ids[0, _int(rng, 1, t - 1):] = 0
    cases.append(Case((ids, 1, 2), {"pad_id": 0}, _label(token_ids=ids, start_id=1, end_id=2, pad_id=0)))
    return cases


def _end_after_padding(token_ids, start_id, end_id, pad_id=0):
    ids = np.asarray(token_ids)
    column = lambda v: np.full((ids.shape[0], 1), v, ids.dtype)  # noqa: E731
    return np.concatenate([column(start_id), ids, column(end_id)], axis=1)


def _no_end(token_ids, start_id, end_id, pad_id=0):
    ids = np.asarray(token_ids)
    return np.concatenate([np.full((ids.shape[0], 1), start_id, ids.dtype), ids], axis=1)


ADD_START_END = Question(
    name="add_start_end",
    signature="add_start_end(token_ids, start_id, end_id, pad_id=0)",
    points=2,
    summary="(B, T + 2): start_id, the real tokens, end_id, then padding.",
    reference=add_start_end,
    cases=_pack_cases,
    output=Output("int"),
    mistakes=(
        Mistake(
            "end_after_padding",
            "end_id is at the very end of the row, after the padding. It belongs right after "
            "the last *real* token; the padding comes after it.",
            impl=_end_after_padding,
        ),
        Mistake(
            "no_end_token",
            "There is no end_id: the result is (B, T + 1). Without [END] as a label the decoder "
            "never learns to stop.",
            impl=_no_end,
        ),
        Mistake(
            "start_end_swapped",
            "start_id and end_id are swapped.",
            impl=lambda token_ids, start_id, end_id, pad_id=0: add_start_end(token_ids, end_id, start_id, pad_id),
        ),
        Mistake(
            "ignores_pad_id",
            "Padding is taken to be 0 whatever pad_id says. Compare with pad_id: here 0 is a "
            "real token.",
            impl=lambda token_ids, start_id, end_id, pad_id=0: add_start_end(token_ids, start_id, end_id, 0),
            applies=lambda case: case.kwargs.get("pad_id", 0) != 0,
        ),
    ),
    hints=(
        "Row b has n_b real tokens (those != pad_id, all at the front). The result's row b is "
        "start_id, those n_b tokens, end_id, then T - n_b pads.",
        "Shift the tokens one step right (a start column in front) and add a pad column at the "
        "end; then write end_id at position n_b + 1, where n_b = sum(token_ids != pad_id, axis=1).",
        "`n = ops.sum(ops.cast(ids != pad_id, 'int32'), axis=1)`; "
        "`out = ops.concatenate([start_col, ids, pad_col], axis=1)`; "
        "`return ops.where(ops.arange(T + 2)[None, :] == (n + 1)[:, None], end_id, out)`.",
    ),
)


# ---------------------------------------------------------------------------
# loss_weights
# ---------------------------------------------------------------------------
def loss_weights(labels, pad_id=0, tag_ids=None):
    """Reference: 1.0 where a label counts (not padding, not a task tag), else 0.0."""
    labels = np.asarray(labels)
    keep = labels != pad_id
    if tag_ids is not None:
        keep &= ~np.isin(labels, np.asarray(tag_ids))
    return keep.astype(np.float32)


def _weight_cases(rng):
    cases = []
    # 1. Padding only, default arguments.
    b, t = 3, _int(rng, 4, 6)
    labels = rng.integers(6, 40, size=(b, t)).astype(np.int32)
    labels[~_lengths_mask(rng.integers(1, t + 1, size=b), t)] = 0
    labels[0, -1] = 0
    cases.append(Case((labels,), {}, _label(labels=labels)))
    # 2. Task tags in the first column (labels of a [START] [FR] ... sequence).
    b, t = 2, _int(rng, 4, 6)
    labels = rng.integers(6, 40, size=(b, t)).astype(np.int32)
    tags = np.array([4, 5], dtype=np.int32)
    labels[:, 0] = rng.choice(tags, size=b)
    labels[~_lengths_mask([t, _int(rng, 2, t - 1)], t)] = 0
    cases.append(Case((labels,), {"tag_ids": tags}, _label(labels=labels, tag_ids=tags)))
    # 3. A non-zero pad id.
    b, t, pad = 2, _int(rng, 3, 5), _int(rng, 1, 3)
    labels = rng.integers(6, 40, size=(b, t)).astype(np.int32)
    labels[:, 0] = 0  # 0 is a real token here
    labels[~_lengths_mask([_int(rng, 1, t - 1), t], t)] = pad
    cases.append(Case((labels,), {"pad_id": pad}, _label(labels=labels, pad_id=pad)))
    return cases


LOSS_WEIGHTS = Question(
    name="loss_weights",
    signature="loss_weights(labels, pad_id=0, tag_ids=None)",
    points=1,
    summary="float (B, T): 1.0 where the label counts in the loss, 0.0 at padding and task tags.",
    reference=loss_weights,
    cases=_weight_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "counts_padding",
            "Padded labels get weight 1: the loss would teach the model to predict [PAD]. "
            "Weight 0 where labels == pad_id.",
            impl=lambda labels, pad_id=0, tag_ids=None: loss_weights(labels, pad_id=-1, tag_ids=tag_ids),
        ),
        Mistake(
            "counts_tags",
            "Task tags get weight 1. A tag is given to the decoder, never predicted: weight 0 "
            "where the label is one of tag_ids.",
            impl=lambda labels, pad_id=0, tag_ids=None: loss_weights(labels, pad_id),
            applies=lambda case: case.kwargs.get("tag_ids") is not None,
        ),
        Mistake(
            "inverted",
            "The weights are inverted: 1 at padding and tags, 0 at the real labels.",
            impl=lambda labels, pad_id=0, tag_ids=None: 1.0 - loss_weights(labels, pad_id, tag_ids),
        ),
        Mistake(
            "ignores_pad_id",
            "Padding is taken to be 0 whatever pad_id says.",
            impl=lambda labels, pad_id=0, tag_ids=None: loss_weights(labels, 0, tag_ids),
            applies=lambda case: case.kwargs.get("pad_id", 0) != 0,
        ),
    ),
    hints=(
        "A label counts unless it is padding or a task tag.",
        "Start from `labels != pad_id`; for each id in tag_ids, AND with `labels != tag`. "
        "Cast the result to float32.",
        "`keep = ops.not_equal(labels, pad_id)`; `for tag in tag_ids: keep = ops.logical_and(keep, "
        "ops.not_equal(labels, int(tag)))`; `return ops.cast(keep, 'float32')`.",
    ),
)


# ---------------------------------------------------------------------------
# greedy_generate
# ---------------------------------------------------------------------------
def greedy_generate(next_token_logits, start_id, end_id, max_steps):
    """Reference: feed back the argmax token; after ``end_id``, pad with 0. int ``(max_steps,)``."""
    logits = np.asarray(next_token_logits)
    out = np.zeros(max_steps, np.int64)
    current = start_id
    for step in range(max_steps):
        current = int(np.argmax(logits[current]))
        out[step] = current
        if current == end_id:
            break
    return out


def _table(rng, vocab):
    logits = rng.standard_normal((vocab, vocab)).astype(np.float32)
    logits[:, 0] = -50.0  # the pad id is never generated
    return logits


def _generate_cases(rng):
    cases = []
    # 1. A path that reaches [END] before max_steps.
    vocab, start, end = _int(rng, 8, 12), 1, 2
    logits = _table(rng, vocab)
    path = rng.choice(np.arange(3, vocab), size=_int(rng, 2, 3), replace=False)
    chain = [start, *path.tolist(), end]
    for a, b in zip(chain[:-1], chain[1:]):
        logits[a, b] = 10.0
    steps = len(chain) + _int(rng, 2, 3)
    cases.append(Case((logits, start, end, steps), {}, f"a ({vocab}, {vocab}) table whose greedy path is "
                      f"{chain}, max_steps={steps}"))
    # 2. A table where [END] is never chosen.
    vocab = _int(rng, 6, 9)
    logits = _table(rng, vocab)
    logits[:, 2] = -40.0
    logits[1, _int(rng, 3, vocab - 1)] = 10.0  # the first step is not a loop back to start
    steps = _int(rng, 5, 7)
    cases.append(Case((logits, 1, 2, steps), {}, f"a ({vocab}, {vocab}) table that never picks end_id=2, "
                      f"max_steps={steps}"))
    # 3. Another start id, reaching [END].
    vocab, start, end = _int(rng, 8, 10), 3, 1
    logits = _table(rng, vocab)
    path = rng.choice(np.arange(4, vocab), size=2, replace=False)
    chain = [start, *path.tolist(), end]
    for a, b in zip(chain[:-1], chain[1:]):
        logits[a, b] = 10.0
    logits[end, 4:] += 20.0  # continuing after [END] would produce real-looking tokens
    cases.append(Case((logits, start, end, 6), {}, f"a ({vocab}, {vocab}) table whose greedy path is "
                      f"{chain}, max_steps=6"))
    return cases


def _no_stop(next_token_logits, start_id, end_id, max_steps):
    return greedy_generate(next_token_logits, start_id, -1, max_steps)


def _with_start(next_token_logits, start_id, end_id, max_steps):
    return np.concatenate([[start_id], greedy_generate(next_token_logits, start_id, end_id, max_steps)[:-1]])


def _no_feedback(next_token_logits, start_id, end_id, max_steps):
    first = int(np.argmax(np.asarray(next_token_logits)[start_id]))
    out = np.full(max_steps, first, np.int64)
    if first == end_id:
        out[1:] = 0
    return out


def _columns(next_token_logits, start_id, end_id, max_steps):
    return greedy_generate(np.asarray(next_token_logits).T, start_id, end_id, max_steps)


GREEDY_GENERATE = Question(
    name="greedy_generate",
    signature="greedy_generate(next_token_logits, start_id, end_id, max_steps)",
    points=2,
    summary="int (max_steps,): greedy free-running decoding from start_id; 0 after end_id.",
    reference=greedy_generate,
    cases=_generate_cases,
    output=Output("int"),
    mistakes=(
        Mistake(
            "does_not_stop_at_end",
            "Generation goes on after end_id. Once end_id is generated, stop: the remaining "
            "positions are 0 (padding).",
            impl=_no_stop,
        ),
        Mistake(
            "includes_start",
            "The result starts with start_id. start_id is the first *input*; return only the "
            "generated tokens.",
            impl=_with_start,
        ),
        Mistake(
            "does_not_feed_back",
            "Every step reads start_id, so the same token is predicted again and again. At "
            "inference the decoder reads its *own* previous output: the next step's input is "
            "the token just generated.",
            impl=_no_feedback,
        ),
        Mistake(
            "wrong_axis",
            "The scores are read by column. Row `t` of next_token_logits holds the scores of the "
            "token that follows token `t`: use `next_token_logits[current]`.",
            impl=_columns,
        ),
    ),
    hints=(
        "Keep a `current` token, starting at start_id. Each step: pick the best next token, "
        "record it, and make it `current`.",
        "`current = int(np.argmax(next_token_logits[current]))`; stop when it equals end_id. "
        "Start from an array of max_steps zeros and fill it.",
        "`out = np.zeros(max_steps, 'int32'); current = start_id`; `for step in range(max_steps): "
        "current = int(np.argmax(logits[current])); out[step] = current; if current == end_id: break`.",
    ),
)


EXERCISE_SET = ExerciseSet(
    id="01_decoder_inputs",
    title="Decoder inputs",
    questions=(ADD_START_END, LOSS_WEIGHTS, GREEDY_GENERATE),
)
