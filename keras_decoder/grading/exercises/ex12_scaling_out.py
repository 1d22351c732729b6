"""Exercise set 12: scaling out.

============================= ============================================== ======
function                      returns                                        points
============================= ============================================== ======
``shard_shape``               int ``(ndim,)``: one device's piece of a weight    1
``weighted_all_reduce``       float ``(P,)``: the global mean gradient           1
``blocked_causal_attention``  float ``(T, D)``: attention, keys in blocks        3
============================= ============================================== ======

NumPy only: the grader never imports Keras.
"""

import numpy as np

from ..spec import Case, ExerciseSet, Mistake, Output, Question
from ._common import label as _label, randint as _int


# ---------------------------------------------------------------------------
# shard_shape
# ---------------------------------------------------------------------------
def shard_shape(shape, layout, mesh_shape):
    """Reference: ``shape[i] // mesh_shape[layout[i]]`` where ``layout[i] >= 0``, else ``shape[i]``."""
    shape, layout, mesh = (np.asarray(a, np.int64) for a in (shape, layout, mesh_shape))
    return np.array([n // mesh[a] if a >= 0 else n for n, a in zip(shape, layout)], np.int64)


def _shard_cases(rng):
    cases = []
    for mesh in (np.array([2, 4]), np.array([4, 2]), np.array([2, 2, 2])):
        for _ in range(2):
            ndim = _int(rng, 1, 3)
            layout = np.full(ndim, -1, np.int64)
            cut = _int(rng, 0, ndim - 1)
            layout[cut] = _int(rng, 0, len(mesh) - 1)
            shape = np.array([int(mesh.prod()) * _int(rng, 1, 4) for _ in range(ndim)], np.int64)
            cases.append(Case((shape, layout, mesh), {}, _label(shape=shape, layout=layout, mesh_shape=mesh)))
        # one replicated weight, one weight cut on every dim
        shape = np.array([8 * _int(rng, 1, 3)], np.int64)
        cases.append(Case((shape, np.array([-1]), mesh), {}, _label(shape=shape, layout=np.array([-1]), mesh_shape=mesh)))
    shape, layout, mesh = np.array([8, 16, 4]), np.array([0, -1, 1]), np.array([2, 4])
    cases.append(Case((shape, layout, mesh), {}, _label(shape=shape, layout=layout, mesh_shape=mesh)))
    return cases


def _shard_all_devices(shape, layout, mesh_shape):
    shape, layout, mesh = (np.asarray(a, np.int64) for a in (shape, layout, mesh_shape))
    return np.array([n // mesh.prod() if a >= 0 else n for n, a in zip(shape, layout)], np.int64)


def _shard_minus_one_indexes(shape, layout, mesh_shape):
    shape, layout, mesh = (np.asarray(a, np.int64) for a in (shape, layout, mesh_shape))
    return np.array([n // mesh[a] for n, a in zip(shape, layout)], np.int64)  # mesh[-1]: the last axis


def _shard_axes_reversed(shape, layout, mesh_shape):
    return shard_shape(shape, layout, np.asarray(mesh_shape)[::-1])


SHARD_SHAPE = Question(
    name="shard_shape",
    signature="shard_shape(shape, layout, mesh_shape)",
    points=1,
    summary="int (ndim,): the shape of the piece of a weight that one device stores.",
    reference=shard_shape,
    cases=_shard_cases,
    output=Output("int"),
    mistakes=(
        Mistake(
            "divided_by_all_devices",
            "A cut dimension was divided by the total number of devices. It is cut only across "
            "the mesh axis that the layout names: divide by mesh_shape[layout[i]].",
            impl=_shard_all_devices,
        ),
        Mistake(
            "minus_one_used_as_index",
            "Replicated dimensions (layout -1) were divided too: mesh_shape[-1] is the last mesh "
            "axis in Python. Test layout[i] >= 0 first.",
            impl=_shard_minus_one_indexes,
        ),
        Mistake(
            "mesh_axes_reversed",
            "The mesh axes were read in reverse order. layout[i] = j means mesh axis j, "
            "whose size is mesh_shape[j].",
            impl=_shard_axes_reversed,
        ),
    ),
    hints=(
        "Go dimension by dimension: is it cut, and if so, across which mesh axis?",
        "A dimension with layout[i] == -1 is replicated: every device has all of it.",
        "`np.array([n // mesh_shape[a] if a >= 0 else n for n, a in zip(shape, layout)])`.",
    ),
)


# ---------------------------------------------------------------------------
# weighted_all_reduce
# ---------------------------------------------------------------------------
def weighted_all_reduce(device_gradients, device_counts):
    """Reference: ``sum_d n_d g_d / sum_d n_d`` over devices ``d``.

    ``device_gradients`` float ``(N, P)``: each device's gradient, a mean over its
    ``device_counts[d]`` real tokens (int ``(N,)``, all > 0).
    """
    g = np.asarray(device_gradients, np.float64)
    n = np.asarray(device_counts, np.float64)
    return (n[:, None] * g).sum(0) / n.sum()


def _reduce_cases(rng):
    cases = []
    for devices, params in ((8, _int(rng, 3, 6)), (4, 5), (_int(rng, 2, 3), 4)):
        g = rng.standard_normal((devices, params)).astype(np.float32)
        counts = rng.integers(1, 40, size=devices)
        counts[0] = counts[1] + _int(rng, 5, 20)  # never all equal
        cases.append(Case((g, counts), {}, _label(device_gradients=g, device_counts=counts)))
    return cases


WEIGHTED_ALL_REDUCE = Question(
    name="weighted_all_reduce",
    signature="weighted_all_reduce(device_gradients, device_counts)",
    points=1,
    summary="float (P,): the gradient of the mean loss over all tokens, from per-device means.",
    reference=weighted_all_reduce,
    cases=_reduce_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "plain_mean_over_devices",
            "The devices' gradients were averaged with equal weights. A device that saw more real "
            "tokens carries more of the loss: weight each gradient by its count.",
            impl=lambda device_gradients, device_counts: np.asarray(device_gradients, np.float64).mean(0),
        ),
        Mistake(
            "divided_by_devices",
            "The weighted sum was divided by the number of devices. Divide by the total number of "
            "tokens, sum(device_counts).",
            impl=lambda device_gradients, device_counts: (
                np.asarray(device_counts, np.float64)[:, None] * np.asarray(device_gradients, np.float64)
            ).sum(0) / len(device_counts),
        ),
        Mistake(
            "sum_not_mean",
            "The gradients were summed, not averaged. The loss is a mean over tokens, so its "
            "gradient is a weighted mean of the devices' gradients.",
            impl=lambda device_gradients, device_counts: np.asarray(device_gradients, np.float64).sum(0),
        ),
    ),
    hints=(
        "Each device's gradient is a mean over its own tokens. Turn it back into a sum first.",
        "Device d contributes device_counts[d] * device_gradients[d] to the sum over all tokens.",
        "`return ops.sum(n[:, None] * g, axis=0) / ops.sum(n)` with n as float.",
    ),
)


# ---------------------------------------------------------------------------
# blocked_causal_attention
# ---------------------------------------------------------------------------
def _scores(q, k):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    return q @ k.T / np.sqrt(q.shape[-1])


def _causal(t_q, t_k, start=0):
    return np.arange(start, start + t_k)[None, :] <= np.arange(t_q)[:, None]


def blocked_causal_attention(q, k, v, block_size):
    """Reference: causal softmax attention ``(T, D)``; the result does not depend on ``block_size``."""
    s = _scores(q, k)
    s = np.where(_causal(*s.shape), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ np.asarray(v, np.float64)


def _blocked(q, k, v, block_size, *, rescale=True, causal=True, scale=True):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t = q.shape[0]
    m, l, acc = np.full((t, 1), -np.inf), np.zeros((t, 1)), np.zeros((t, v.shape[1]))
    for start in range(0, k.shape[0], block_size):
        s = q @ k[start:start + block_size].T
        if scale:
            s = s / np.sqrt(q.shape[-1])
        if causal:
            s = np.where(_causal(t, s.shape[1], start), s, -np.inf)
        m_new = np.maximum(m, s.max(-1, keepdims=True))
        p = np.exp(s - m_new)
        factor = np.exp(m - m_new) if rescale else 1.0
        l = l * factor + p.sum(-1, keepdims=True)
        acc = acc * factor + p @ v[start:start + block_size]
        m = m_new
    return acc / l


def _block_average(q, k, v, block_size):
    """Each block normalised on its own, then the blocks averaged."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    t = q.shape[0]
    total, used = np.zeros((t, v.shape[1])), np.zeros((t, 1))
    for start in range(0, k.shape[0], block_size):
        s = _scores(q, k[start:start + block_size])
        allowed = _causal(t, s.shape[1], start)
        s = np.where(allowed, s, -np.inf)
        any_ = allowed.any(-1, keepdims=True)
        s = np.where(any_, s, 0.0)
        p = np.where(allowed, np.exp(s - s.max(-1, keepdims=True)), 0.0)
        p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
        total += p @ v[start:start + block_size]
        used += any_
    return total / used


def _attention_cases(rng):
    cases = []
    for t, d, block in ((_int(rng, 8, 11), 4, 3), (12, _int(rng, 3, 6), 4), (7, 8, 2)):
        q, k, v = (2.0 * rng.standard_normal((3, t, d))).astype(np.float32)
        cases.append(Case((q, k, v, block), {}, f"q, k, v of shape {(t, d)}, block_size={block}"))
    return cases


BLOCKED_CAUSAL_ATTENTION = Question(
    name="blocked_causal_attention",
    signature="blocked_causal_attention(q, k, v, block_size)",
    points=3,
    summary="float (T, D): causal attention computed over key blocks with an online softmax.",
    reference=blocked_causal_attention,
    cases=_attention_cases,
    output=Output("float"),
    mistakes=(
        Mistake(
            "no_rescaling",
            "When a block raises the running maximum, the sums kept so far were not rescaled. "
            "Multiply l and acc by exp(m_old - m_new) before adding the new block.",
            impl=lambda q, k, v, block_size: _blocked(q, k, v, block_size, rescale=False),
        ),
        Mistake(
            "not_causal",
            "Every query saw every key. Key j of the block starting at `start` is position "
            "start + j; query i may see it only if start + j <= i.",
            impl=lambda q, k, v, block_size: _blocked(q, k, v, block_size, causal=False),
        ),
        Mistake(
            "missing_scale",
            "The scores were not divided by sqrt(D).",
            impl=lambda q, k, v, block_size: _blocked(q, k, v, block_size, scale=False),
        ),
        Mistake(
            "blocks_averaged",
            "Each block was normalised on its own and the blocks averaged. The softmax is over "
            "all keys at once: keep a running max and a running sum across blocks.",
            impl=_block_average,
        ),
    ),
    hints=(
        "Keep three running arrays per query: the max m (T, 1), the sum of exp l (T, 1), and the "
        "weighted sum acc (T, D).",
        "For a block: s = q k_blockᵀ/√D with the causal mask; m_new = max(m, max(s)); "
        "p = exp(s - m_new); scale = exp(m - m_new).",
        "`l = l * scale + p.sum(-1, keepdims=True)`; `acc = acc * scale + p @ v_block`; "
        "`m = m_new`; at the end `return acc / l`.",
    ),
)


EXERCISE_SET = ExerciseSet(
    id="12_scaling_out",
    title="Scaling out",
    questions=(SHARD_SHAPE, WEIGHTED_ALL_REDUCE, BLOCKED_CAUSAL_ATTENTION),
)
