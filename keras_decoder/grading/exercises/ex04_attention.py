"""Exercise set 04: attention.

========================== ================================================ ======
function                   returns                                          points
========================== ================================================ ======
``split_heads``            float ``(B, T, H, C // H)``                       1
``multi_head_attention``   float ``(B, Tq, C)``: MHA / GQA / MQA, no biases   4
``kv_cache_bytes``         int ``(N,)``: KV-cache bytes per head count        1
========================== ================================================ ======

NumPy only: the grader never imports Keras.
"""

import numpy as np

from ..spec import Case, ExerciseSet, Mistake, Output, Question, format_value
from ._common import label as _label, randint as _int


# ---------------------------------------------------------------------------
# split_heads
# ---------------------------------------------------------------------------
def split_heads(x, num_heads):
    """Reference: ``(B, T, C)`` -> ``(B, T, H, C // H)``; head ``h`` holds channels ``h*D .. h*D + D - 1``."""
    x = np.asarray(x)
    b, t, c = x.shape
    return x.reshape(b, t, num_heads, c // num_heads)


def _split_cases(rng):
    cases = []
    for b, t, h, d in ((2, _int(rng, 3, 5), 2, 4), (1, 6, 3, 2), (2, 2, 4, 3)):
        x = rng.standard_normal((b, t, h * d)).astype(np.float32)
        cases.append(Case((x, h), {}, f"x of shape {x.shape}, num_heads={h}"))
    return cases


SPLIT_HEADS = Question(
    name="split_heads",
    signature="split_heads(x, num_heads)",
    points=1,
    summary="(B, T, H, C // H): the channels of each token cut into H consecutive heads.",
    reference=split_heads,
    cases=_split_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "heads_first_layout",
            "The result is (B, H, T, D). The layout of this course and of "
            "`keras.ops.dot_product_attention` is (batch, seq_len, heads, head_dim).",
            impl=lambda x, num_heads: split_heads(x, num_heads).transpose(0, 2, 1, 3),
        ),
        Mistake(
            "reshaped_heads_first",
            "You reshaped straight to (B, H, T, D). A reshape keeps the memory order, so that "
            "mixes tokens into heads. Reshape to (B, T, H, D): the channels of one token are "
            "contiguous.",
            impl=lambda x, num_heads: np.asarray(x).reshape(
                np.shape(x)[0], num_heads, np.shape(x)[1], np.shape(x)[2] // num_heads),
        ),
        Mistake(
            "strided_heads",
            "Head h got the channels h, h + H, h + 2H, ... (a (B, T, D, H) reshape). Each head "
            "is a block of D consecutive channels, as in Keras's projection kernels (C, H, D).",
            impl=lambda x, num_heads: np.asarray(x).reshape(
                np.shape(x)[0], np.shape(x)[1], np.shape(x)[2] // num_heads, num_heads).transpose(0, 1, 3, 2),
        ),
    ),
    hints=(
        "No arithmetic is needed, only a reshape.",
        "The last axis C = H * D splits into (H, D) in that order.",
        "`B, T, C = ops.shape(x); return ops.reshape(x, (B, T, num_heads, C // num_heads))`.",
    ),
)


# ---------------------------------------------------------------------------
# multi_head_attention
# ---------------------------------------------------------------------------
def _mha(query, value, wq, wk, wv, wo, mask=None, *, scale=True, repeat="repeat", expand=True,
         axis=-1, project=True):
    xq, xv = np.asarray(query, np.float64), np.asarray(value, np.float64)
    q = np.einsum("btc,chd->bthd", xq, wq)  # (B, Tq, H, D)
    k = np.einsum("btc,chd->bthd", xv, wk)  # (B, Tk, Hkv, D)
    v = np.einsum("btc,chd->bthd", xv, wv)
    r = q.shape[2] // k.shape[2]
    if repeat == "repeat":
        k, v = np.repeat(k, r, axis=2), np.repeat(v, r, axis=2)
    else:
        k, v = np.tile(k, (1, 1, r, 1)), np.tile(v, (1, 1, r, 1))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k)
    if scale:
        scores = scores / np.sqrt(q.shape[-1])
    if mask is not None:
        m = np.asarray(mask, bool)
        if expand and m.ndim == 3:
            m = m[:, None]
        scores = np.where(m, scores, -1e30)
    weights = np.exp(scores - scores.max(axis=axis, keepdims=True))
    weights = weights / weights.sum(axis=axis, keepdims=True)
    heads = np.einsum("bhqk,bkhd->bqhd", weights, v)
    return np.einsum("bthd,hdc->btc", heads, wo) if project else heads


def multi_head_attention(query, value, wq, wk, wv, wo, mask=None):
    """Reference: multi-head attention with Keras's kernel shapes and no biases; ``(B, Tq, C)``.

    ``wq`` ``(C, H, D)``, ``wk`` and ``wv`` ``(C, Hkv, D)`` with ``H % Hkv == 0`` (key/value
    head ``g`` serves query heads ``g*H/Hkv .. (g+1)*H/Hkv - 1``), ``wo`` ``(H, D, C)``.
    ``mask``: ``None``, ``(Tq, Tk)`` or ``(B, Tq, Tk)``, every row with an allowed key.
    """
    return _mha(query, value, wq, wk, wv, wo, mask)


def _weights(rng, c, h, hkv, d):
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)  # noqa: E731
    return w(c, h, d), w(c, hkv, d), w(c, hkv, d), w(h, d, c)


def _mha_cases(rng):
    cases = []
    # 1. Self-attention, 2 heads, no mask.
    b, t, c, h, d = 2, _int(rng, 3, 5), 8, 2, 4
    x = (1.5 * rng.standard_normal((b, t, c))).astype(np.float32)
    cases.append(Case((x, x, *_weights(rng, c, h, h, d)), {}, f"query = value {x.shape}, H=2, H_kv=2, no mask"))
    # 2. Cross-attention (Tq != Tk) with a (B, Tq, Tk) padding mask; B != H.
    b, tq, tk, c, h, d = 3, _int(rng, 2, 3), _int(rng, 4, 5), 6, 2, 3
    q = (1.5 * rng.standard_normal((b, tq, c))).astype(np.float32)
    v = (1.5 * rng.standard_normal((b, tk, c))).astype(np.float32)
    keys = np.arange(tk)[None, :] < rng.integers(1, tk + 1, size=b)[:, None]
    mask = np.broadcast_to(keys[:, None, :], (b, tq, tk)).copy()
    cases.append(Case((q, v, *_weights(rng, c, h, h, d)), {"mask": mask},
                      f"query {q.shape}, value {v.shape}, H=2, H_kv=2, mask (B, Tq, Tk)={format_value(mask)}"))
    # 2b. The same with B == H: a mask without a head axis then broadcasts silently, wrongly.
    b, tq, tk, c, h, d = 2, _int(rng, 2, 3), _int(rng, 4, 5), 6, 2, 3
    q = (1.5 * rng.standard_normal((b, tq, c))).astype(np.float32)
    v = (1.5 * rng.standard_normal((b, tk, c))).astype(np.float32)
    keys = np.arange(tk)[None, :] < np.array([tk, _int(rng, 1, tk - 1)])[:, None]
    mask = np.broadcast_to(keys[:, None, :], (b, tq, tk)).copy()
    cases.append(Case((q, v, *_weights(rng, c, h, h, d)), {"mask": mask},
                      f"query {q.shape}, value {v.shape}, H=2, H_kv=2, mask (B, Tq, Tk)={format_value(mask)}"))
    # 3. Grouped-query attention: 4 query heads, 2 key/value heads, causal (Tq, Tk) mask.
    b, t, c, h, hkv, d = 2, _int(rng, 3, 5), 8, 4, 2, 2
    x = (1.5 * rng.standard_normal((b, t, c))).astype(np.float32)
    mask = np.tril(np.ones((t, t), bool))
    cases.append(Case((x, x, *_weights(rng, c, h, hkv, d)), {"mask": mask},
                      f"query = value {x.shape}, H=4, H_kv=2 (GQA), causal mask {mask.shape}"))
    # 4. Multi-query attention: 3 query heads share one key/value head.
    b, t, c, h, d = 1, _int(rng, 3, 4), 6, 3, 2
    x = (1.5 * rng.standard_normal((b, t, c))).astype(np.float32)
    cases.append(Case((x, x, *_weights(rng, c, h, 1, d)), {}, f"query = value {x.shape}, H=3, H_kv=1 (MQA), no mask"))
    return cases


def _variant(**switches):
    def impl(query, value, wq, wk, wv, wo, mask=None):
        return _mha(query, value, wq, wk, wv, wo, mask, **switches)

    return impl


def _is_gqa(case):
    wq, wk = case.args[2], case.args[3]
    return 1 < wk.shape[1] < wq.shape[1]


MULTI_HEAD_ATTENTION = Question(
    name="multi_head_attention",
    signature="multi_head_attention(query, value, wq, wk, wv, wo, mask=None)",
    points=4,
    summary="(B, Tq, C): project, attend per head (shared key/value heads for GQA/MQA), project back.",
    reference=multi_head_attention,
    cases=_mha_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "missing_scale",
            "The scores are not divided by √D (D = the head size, wq.shape[-1]).",
            impl=_variant(scale=False),
        ),
        Mistake(
            "kv_heads_tiled",
            "Query head h used key/value head h % H_kv (`tile`). Each key/value head serves a "
            "block of consecutive query heads: use `ops.repeat(k, H // H_kv, axis=2)`, as "
            "`keras.layers.GroupQueryAttention` does.",
            impl=_variant(repeat="tile"),
            applies=_is_gqa,
        ),
        Mistake(
            "no_output_projection",
            "The result is (B, Tq, H, D): the heads are not projected back. Finish with "
            "`ops.einsum('bthd,hdc->btc', heads, wo)`.",
            impl=_variant(project=False),
        ),
        Mistake(
            "mask_not_broadcast_over_heads",
            "A (B, Tq, Tk) mask is applied to (B, H, Tq, Tk) scores without a head axis. "
            "Expand it to (B, 1, Tq, Tk).",
            impl=_variant(expand=False),
            applies=lambda case: case.kwargs.get("mask") is not None and np.ndim(case.kwargs["mask"]) == 3,
        ),
        Mistake(
            "softmax_over_queries",
            "The softmax runs over the queries. Each query's weights over the keys sum to 1: "
            "softmax over the last axis of (B, H, Tq, Tk).",
            impl=_variant(axis=-2),
            applies=lambda case: case.kwargs.get("mask") is None,
        ),
    ),
    hints=(
        "Three einsums project: `ops.einsum('btc,chd->bthd', query, wq)` and the same for keys "
        "and values from `value`. Then attention per head, then `wo`.",
        "With fewer key/value heads, repeat them: `ops.repeat(k, H // Hkv, axis=2)`. A (B, Tq, Tk) "
        "mask needs a head axis: `mask[:, None]`.",
        "`scores = ops.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(D)`; `ops.where(mask, scores, -1e30)`; "
        "softmax over the last axis; `heads = ops.einsum('bhqk,bkhd->bqhd', w, v)`; "
        "`return ops.einsum('bthd,hdc->btc', heads, wo)`.",
    ),
)


# ---------------------------------------------------------------------------
# kv_cache_bytes
# ---------------------------------------------------------------------------
def kv_cache_bytes(num_layers, batch_size, seq_len, num_kv_heads, head_dim, bytes_per_number):
    """Reference: ``2 * layers * batch * seq_len * kv_heads * head_dim * bytes`` (keys and values).

    ``num_kv_heads`` is an int array of candidate head counts (MHA, GQA, MQA); the
    result has its shape: one cache size per candidate.
    """
    heads = np.asarray(num_kv_heads, np.int64)
    return 2 * num_layers * batch_size * seq_len * heads * head_dim * bytes_per_number


def _cache_cases(rng):
    cases = []
    names = ("num_layers", "batch_size", "seq_len", "num_kv_heads", "head_dim", "bytes_per_number")
    for _ in range(3):
        query_heads = int(rng.choice([8, 16]))
        heads = np.array([query_heads, query_heads // int(rng.choice([2, 4])), 1], dtype=np.int32)
        args = (_int(rng, 2, 12), _int(rng, 1, 2), int(rng.choice([128, 512, 1024])), heads,
                int(rng.choice([32, 64])), int(rng.choice([2, 4])))
        cases.append(Case(args, {}, _label(**dict(zip(names, args)))))
    return cases


def _cache_variant(factor=2, layers=True, bits=1):
    def impl(num_layers, batch_size, seq_len, num_kv_heads, head_dim, bytes_per_number):
        heads = np.asarray(num_kv_heads, np.int64)
        n_layers = num_layers if layers else 1
        return factor * n_layers * batch_size * seq_len * heads * head_dim * bytes_per_number * bits

    return impl


KV_CACHE_BYTES = Question(
    name="kv_cache_bytes",
    signature="kv_cache_bytes(num_layers, batch_size, seq_len, num_kv_heads, head_dim, bytes_per_number)",
    points=1,
    summary="int (N,): the bytes of a KV cache (keys and values, every layer) for each candidate num_kv_heads.",
    reference=kv_cache_bytes,
    cases=_cache_cases,
    output=Output("int"),
    mistakes=(
        Mistake(
            "keys_only",
            "Only the keys are counted. The cache holds keys **and** values: a factor 2.",
            impl=_cache_variant(factor=1),
        ),
        Mistake(
            "one_layer",
            "Only one layer is counted. Every layer keeps its own keys and values.",
            impl=_cache_variant(layers=False),
        ),
        Mistake(
            "bits_not_bytes",
            "The result is in bits: bytes_per_number is already in bytes, do not multiply by 8.",
            impl=_cache_variant(bits=8),
        ),
    ),
    hints=(
        "Each layer stores one key vector and one value vector per token and key/value head.",
        "Count numbers first: 2 (keys and values) x layers x batch x tokens x kv heads x head_dim; "
        "`num_kv_heads` is an array, so the formula gives one size per candidate.",
        "`return 2 * num_layers * batch_size * seq_len * np.asarray(num_kv_heads) * head_dim * bytes_per_number`.",
    ),
)


EXERCISE_SET = ExerciseSet(
    id="04_attention",
    title="Attention",
    questions=(SPLIT_HEADS, MULTI_HEAD_ATTENTION, KV_CACHE_BYTES),
)
