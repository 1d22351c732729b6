"""Exercise set 05: interacting attention (self, cross and joint).

===================== ======================================================== ======
function              returns                                                  points
===================== ======================================================== ======
``joint_mask``        bool ``(B, Tdec, Tenc + Tdec)``: [memory; decoder] keys    2
``cross_attention``   float ``(B, Tdec, C)``: decoder queries, encoder memory    3
``joint_attention``   float ``(B, Tdec, C)``: one softmax over memory and past   3
===================== ======================================================== ======

NumPy only: the grader never imports Keras.
"""

import numpy as np

from ..spec import Case, ExerciseSet, Mistake, Output, Question, format_value
from ._common import randint as _int, lengths_mask as _lengths_mask


def _padding(rng, batch, length):
    """bool ``(B, T)``, right padding, every row with a real token, at least one row padded."""
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = _int(rng, 1, length - 1)
    return _lengths_mask(rng.permutation(lengths), length)


# ---------------------------------------------------------------------------
# joint_mask
# ---------------------------------------------------------------------------
def _joint(dec, enc, *, order="memory_first", causal=True, top_left=False, mask_queries=False):
    dec, enc = np.asarray(dec, bool), np.asarray(enc, bool)
    b, t_dec = dec.shape
    t_enc = enc.shape[1]
    memory = np.broadcast_to(enc[:, None, :], (b, t_dec, t_enc))
    own = np.broadcast_to(dec[:, None, :], (b, t_dec, t_dec))
    if causal:
        own = own & np.tril(np.ones((t_dec, t_dec), bool))
    parts = [memory, own] if order == "memory_first" else [own, memory]
    mask = np.concatenate(parts, axis=2)
    if top_left:  # key padding over both parts, then one top-left triangle over all columns
        keys = np.concatenate([memory, np.broadcast_to(dec[:, None, :], (b, t_dec, t_dec))], axis=2)
        mask = keys & np.tril(np.ones((t_dec, t_enc + t_dec), bool))
    if mask_queries:
        mask = mask & dec[:, :, None]
    return mask


def joint_mask(decoder_padding_mask, encoder_padding_mask):
    """Reference: bool ``(B, Tdec, Tenc + Tdec)``; memory columns: encoder padding; decoder columns: padding AND causal."""
    return _joint(decoder_padding_mask, encoder_padding_mask)


def _joint_cases(rng):
    cases = []
    for b, t_dec, t_enc in ((2, _int(rng, 3, 5), _int(rng, 3, 5)), (3, _int(rng, 3, 4), 2), (1, 3, _int(rng, 4, 6))):
        dec, enc = _padding(rng, b, t_dec), _padding(rng, b, t_enc)
        cases.append(Case((dec, enc), {}, f"decoder_padding_mask={format_value(dec)}, "
                          f"encoder_padding_mask={format_value(enc)}"))
    return cases


JOINT_MASK = Question(
    name="joint_mask",
    signature="joint_mask(decoder_padding_mask, encoder_padding_mask)",
    points=2,
    summary="bool (B, Tdec, Tenc + Tdec): keys are [memory; decoder], memory by padding, decoder causal too.",
    reference=joint_mask,
    cases=_joint_cases,
    output=Output("bool"),
    mistakes=(
        Mistake(
            "decoder_columns_first",
            "The decoder columns come first. The keys are concat([memory, decoder]): the Tenc "
            "memory columns first, then the Tdec decoder columns.",
            impl=lambda d, e: _joint(d, e, order="decoder_first"),
        ),
        Mistake(
            "decoder_part_not_causal",
            "The decoder columns are not causal: position i could read decoder positions after "
            "it. AND them with the causal mask (j <= i).",
            impl=lambda d, e: _joint(d, e, causal=False),
        ),
        Mistake(
            "top_left_causal_over_both",
            "A top-left causal mask over all Tenc + Tdec columns hides most of the memory from "
            "the first positions. The memory is known in full before decoding: only its padding "
            "is masked. (A *bottom-right* causal mask over the concatenation would be right.)",
            impl=lambda d, e: _joint(d, e, top_left=True),
        ),
        Mistake(
            "masks_queries_too",
            "Padded decoder positions (rows) are masked too. Padding masks mask keys; a padded "
            "query is computed and dropped by the loss mask.",
            impl=lambda d, e: _joint(d, e, mask_queries=True),
        ),
    ),
    hints=(
        "Build the two blocks separately, then concatenate them along the key axis.",
        "Memory block: the encoder padding repeated for each decoder row, (B, Tdec, Tenc). "
        "Decoder block: the decoder padding as keys AND the causal lower triangle, (B, Tdec, Tdec).",
        "`memory = ops.broadcast_to(enc[:, None, :], (B, Tdec, Tenc))`; "
        "`own = ops.logical_and(dec[:, None, :], ops.tril(ops.ones((Tdec, Tdec))) > 0)`; "
        "`return ops.concatenate([memory, own], axis=2)`.",
    ),
)


# ---------------------------------------------------------------------------
# Attention helpers.
# ---------------------------------------------------------------------------
def _project(x, w):
    return np.einsum("btc,chd->bthd", np.asarray(x, np.float64), w)


def _attend(q, k, v, mask, scale=True):
    """``q (B, Tq, H, D)``, ``k, v (B, Tk, H, D)``, bool mask ``(B, Tq, Tk)`` or None; returns weights and heads."""
    scores = np.einsum("bqhd,bkhd->bhqk", q, k)
    if scale:
        scores = scores / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(np.asarray(mask, bool)[:, None], scores, -1e30)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def _weights(rng, c, h, d):
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)  # noqa: E731
    return w(c, h, d), w(c, h, d), w(c, h, d), w(h, d, c)


# ---------------------------------------------------------------------------
# cross_attention
# ---------------------------------------------------------------------------
def _cross(x, memory, wq, wk, wv, wo, enc, *, keys_from="memory", causal=False, use_mask=True, scale=True):
    source = memory if keys_from == "memory" else x
    q, k, v = _project(x, wq), _project(source, wk), _project(source, wv)
    b, t_dec, t_k = q.shape[0], q.shape[1], k.shape[1]
    mask = None
    if use_mask:
        mask = np.broadcast_to(np.asarray(enc, bool)[:, None, :], (b, t_dec, np.shape(enc)[1]))
        if mask.shape[-1] != t_k:
            raise ValueError("the encoder mask does not fit the keys")
        if causal:
            mask = mask & np.tril(np.ones((t_dec, t_k), bool))
    weights = _attend(q, k, v, mask, scale)
    heads = np.einsum("bhqk,bkhd->bqhd", weights, v)
    return np.einsum("bthd,hdc->btc", heads, wo)


def cross_attention(x, memory, wq, wk, wv, wo, encoder_padding_mask):
    """Reference: queries from ``x`` ``(B, Tdec, C)``, keys and values from ``memory`` ``(B, Tenc, C)``."""
    return _cross(x, memory, wq, wk, wv, wo, encoder_padding_mask)


def _cross_cases(rng):
    cases = []
    for b, t_dec, t_enc in ((2, 3, _int(rng, 4, 6)), (3, 4, 4), (2, _int(rng, 4, 5), 3)):
        c, h, d = 6, 2, 3
        x = (1.5 * rng.standard_normal((b, t_dec, c))).astype(np.float32)
        memory = (1.5 * rng.standard_normal((b, t_enc, c))).astype(np.float32)
        enc = _padding(rng, b, t_enc)
        cases.append(Case((x, memory, *_weights(rng, c, h, d), enc), {},
                          f"x {x.shape}, memory {memory.shape}, H=2, encoder_padding_mask={format_value(enc)}"))
    return cases


CROSS_ATTENTION = Question(
    name="cross_attention",
    signature="cross_attention(x, memory, wq, wk, wv, wo, encoder_padding_mask)",
    points=3,
    summary="(B, Tdec, C): decoder queries attend to the real encoder tokens.",
    reference=cross_attention,
    cases=_cross_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "keys_from_decoder",
            "The keys and values come from the decoder (x): that is self-attention. In "
            "cross-attention only the queries come from the decoder; keys and values are "
            "projections of the encoder's output, `memory`.",
            impl=lambda x, m, wq, wk, wv, wo, enc: _cross(x, m, wq, wk, wv, wo, enc, keys_from="x"),
        ),
        Mistake(
            "causal_cross_attention",
            "The cross-attention mask is causal. The encoder's output exists in full before "
            "decoding starts; every decoder position may read every real encoder token.",
            impl=lambda x, m, wq, wk, wv, wo, enc: _cross(x, m, wq, wk, wv, wo, enc, causal=True),
        ),
        Mistake(
            "ignores_encoder_padding",
            "The encoder padding is not masked, so decoder positions read padded encoder "
            "tokens. Mask the keys with encoder_padding_mask, as (B, 1, 1, Tenc).",
            impl=lambda x, m, wq, wk, wv, wo, enc: _cross(x, m, wq, wk, wv, wo, enc, use_mask=False),
        ),
        Mistake(
            "missing_scale",
            "The scores are not divided by √D (D = wq.shape[-1]).",
            impl=lambda x, m, wq, wk, wv, wo, enc: _cross(x, m, wq, wk, wv, wo, enc, scale=False),
        ),
    ),
    hints=(
        "It is Lesson 04's multi-head attention: only where Q, K, V come from, and the mask, change.",
        "q from x with wq; k and v from memory with wk and wv. The mask is the encoder padding, "
        "(B, Tenc) -> (B, 1, 1, Tenc): the same for every head and every decoder position.",
        "`scores = ops.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(D)`; "
        "`scores = ops.where(enc[:, None, None, :], scores, -1e30)`; softmax; weighted sum; `wo`.",
    ),
)


# ---------------------------------------------------------------------------
# joint_attention
# ---------------------------------------------------------------------------
def _joint_attention(x, memory, wq, wk, wv, wo, dec, enc, *, mode="joint", causal=True, use_enc=True):
    q = _project(x, wq)
    t_enc = np.shape(memory)[1]
    enc = np.asarray(enc, bool) if use_enc else np.ones(np.shape(enc), bool)
    mask = _joint(dec, enc, causal=causal)
    if mode == "self_only":
        k, v = _project(x, wk), _project(x, wv)
        weights = _attend(q, k, v, mask[:, :, t_enc:])
        heads = np.einsum("bhqk,bkhd->bqhd", weights, v)
    else:
        both = np.concatenate([np.asarray(memory), np.asarray(x)], axis=1)
        k, v = _project(both, wk), _project(both, wv)
        if mode == "joint":
            heads = np.einsum("bhqk,bkhd->bqhd", _attend(q, k, v, mask), v)
        else:  # two softmaxes, one over the memory and one over the past, summed
            w_mem = _attend(q, k[:, :t_enc], v[:, :t_enc], mask[:, :, :t_enc])
            w_own = _attend(q, k[:, t_enc:], v[:, t_enc:], mask[:, :, t_enc:])
            heads = (np.einsum("bhqk,bkhd->bqhd", w_mem, v[:, :t_enc])
                     + np.einsum("bhqk,bkhd->bqhd", w_own, v[:, t_enc:]))
    return np.einsum("bthd,hdc->btc", heads, wo)


def joint_attention(x, memory, wq, wk, wv, wo, decoder_padding_mask, encoder_padding_mask):
    """Reference: one attention of ``x`` over ``concat([memory, x])`` with the joint mask; ``(B, Tdec, C)``."""
    return _joint_attention(x, memory, wq, wk, wv, wo, decoder_padding_mask, encoder_padding_mask)


def _joint_attention_cases(rng):
    cases = []
    for b, t_dec, t_enc in ((2, _int(rng, 3, 4), _int(rng, 3, 5)), (3, 4, 2), (1, 3, _int(rng, 4, 5))):
        c, h, d = 6, 2, 3
        x = (1.5 * rng.standard_normal((b, t_dec, c))).astype(np.float32)
        memory = (1.5 * rng.standard_normal((b, t_enc, c))).astype(np.float32)
        dec, enc = _padding(rng, b, t_dec), _padding(rng, b, t_enc)
        cases.append(Case((x, memory, *_weights(rng, c, h, d), dec, enc), {},
                          f"x {x.shape}, memory {memory.shape}, H=2, decoder_padding_mask={format_value(dec)}, "
                          f"encoder_padding_mask={format_value(enc)}"))
    return cases


JOINT_ATTENTION = Question(
    name="joint_attention",
    signature="joint_attention(x, memory, wq, wk, wv, wo, decoder_padding_mask, encoder_padding_mask)",
    points=3,
    summary="(B, Tdec, C): x attends to concat([memory, x]) with one softmax and the joint mask.",
    reference=joint_attention,
    cases=_joint_attention_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "two_softmaxes",
            "You normalise the memory and the decoder's past separately and add the results: "
            "that is the *parallel* reading. The joint reading has **one** softmax over all "
            "Tenc + Tdec keys, so memory and past share a total weight of 1.",
            impl=lambda x, m, wq, wk, wv, wo, d, e: _joint_attention(x, m, wq, wk, wv, wo, d, e, mode="parallel"),
        ),
        Mistake(
            "decoder_part_not_causal",
            "The decoder keys are not causal: position i reads later decoder positions.",
            impl=lambda x, m, wq, wk, wv, wo, d, e: _joint_attention(x, m, wq, wk, wv, wo, d, e, causal=False),
        ),
        Mistake(
            "memory_ignored",
            "The memory is missing: this is the decoder's self-attention alone. Keys and values "
            "come from concat([memory, x], axis=1).",
            impl=lambda x, m, wq, wk, wv, wo, d, e: _joint_attention(x, m, wq, wk, wv, wo, d, e, mode="self_only"),
        ),
        Mistake(
            "ignores_encoder_padding",
            "Padded memory positions are attended. The memory columns of the mask are the "
            "encoder padding.",
            impl=lambda x, m, wq, wk, wv, wo, d, e: _joint_attention(x, m, wq, wk, wv, wo, d, e, use_enc=False),
        ),
    ),
    hints=(
        "Concatenate memory and x along the time axis; that sequence gives the keys and values. "
        "The queries come from x alone.",
        "The mask is `joint_mask(decoder_padding_mask, encoder_padding_mask)`, (B, Tdec, Tenc + Tdec); "
        "give it a head axis before `ops.where`.",
        "`both = ops.concatenate([memory, x], axis=1)`; project q from x and k, v from both; "
        "`scores = ops.where(mask[:, None], scores / math.sqrt(D), -1e30)`; one softmax; then `wo`.",
    ),
)


EXERCISE_SET = ExerciseSet(
    id="05_interacting_attention",
    title="Interacting attention",
    questions=(JOINT_MASK, CROSS_ATTENTION, JOINT_ATTENTION),
)
