"""Float64 NumPy references for the RNN decoders and the Transformer blocks.

Written as plainly as possible (loops where a loop says it best): these are
the definitions that ``keras_decoder.rnn``, ``layers`` and ``models`` are
checked against, with weights copied out of the Keras layers.
"""

import numpy as np

from reference import attention as _attention
from reference import causal_mask, self_attention_mask, softmax


def _np(x):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def gelu(x):
    """Exact (erf) GELU, Keras's default ``approximate=False``."""
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def relu(x):
    return np.maximum(x, 0.0)


ACTIVATIONS = {"gelu": gelu, "relu": relu}


# ---------------------------------------------------------------- RNN cells
def gru_cell(x, h, kernel, recurrent_kernel, bias):
    """Keras ``GRUCell`` (``reset_after=True``): gates in the order z, r, h."""
    u = h.shape[-1]
    b_in, b_rec = bias  # (2, 3u)
    xz, xr, xh = [x @ kernel[:, i * u:(i + 1) * u] + b_in[i * u:(i + 1) * u] for i in range(3)]
    hz, hr, hh = [h @ recurrent_kernel[:, i * u:(i + 1) * u] + b_rec[i * u:(i + 1) * u]
                  for i in range(3)]
    z = sigmoid(xz + hz)
    r = sigmoid(xr + hr)
    candidate = np.tanh(xh + r * hh)
    return z * h + (1 - z) * candidate


def lstm_cell(x, h, c, kernel, recurrent_kernel, bias):
    """Keras ``LSTMCell``: gates in the order i, f, c, o."""
    u = h.shape[-1]
    z = x @ kernel + h @ recurrent_kernel + bias
    i, f, g, o = (z[:, k * u:(k + 1) * u] for k in range(4))
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    return h, c


def masked_softmax(scores, mask):
    """Softmax over the last axis; masked entries 0; a fully masked row is 0."""
    if mask is None:
        return softmax(scores)
    mask = np.broadcast_to(mask, scores.shape)
    out = np.zeros_like(scores)
    for idx in np.ndindex(scores.shape[:-1]):
        m = mask[idx]
        if m.any():
            e = np.exp(scores[idx][m] - scores[idx][m].max())
            out[idx][m] = e / e.sum()
    return out


# ---------------------------------------------------------------- RNN attention
def bahdanau_scores(query, memory, w):
    """``vᵀ tanh(W q + U h)`` for ``query (B, Dq)``, ``memory (B, S, M)`` → ``(B, S)``."""
    hidden = np.tanh((query @ w["query"])[:, None, :] + memory @ w["key"])  # (B, S, units)
    return (hidden @ w["score"])[..., 0]


def luong_scores(query, memory, w, score):
    if score == "dot":
        return np.einsum("bd,bsd->bs", query, memory)
    if score == "general":
        return np.einsum("bd,bsd->bs", query, memory @ w["key"])
    hidden = np.tanh((query @ w["query"])[:, None, :] + memory @ w["key"])
    return (hidden @ w["score"])[..., 0]


def rnn_attention_weights(layer):
    """The Dense kernels of a Bahdanau/Luong layer, by sublayer name."""
    out = {}
    for name in ("query", "key", "score"):
        sub = getattr(layer, f"{name}_dense", None)
        if sub is not None:
            out[name] = _np(sub.kernel)
    return out


def rnn_decoder_weights(decoder):
    cell = decoder.cell
    w = {
        "embedding": _np(decoder.token_embedding.embeddings),
        "cell": [_np(cell.kernel), _np(cell.recurrent_kernel), _np(cell.bias)],
        "attention": rnn_attention_weights(decoder.attention),
        "logits": (_np(decoder.logits.kernel), _np(decoder.logits.bias)),
    }
    if decoder.attentional is not None:
        w["attentional"] = _np(decoder.attentional.kernel)
    return w


def rnn_decoder(ids, memory, memory_mask, w, attention="bahdanau", cell="gru", score="general"):
    """Teacher-forced RNN decoder, one Python step at a time.

    Returns ``(logits (B, T, V), weights (B, T, S))``.
    """
    ids = np.asarray(ids)
    memory = np.asarray(memory, np.float64)
    mask = None if memory_mask is None else np.asarray(memory_mask, bool)
    b, t = ids.shape
    units = w["cell"][1].shape[0]
    h = np.zeros((b, units))
    c = np.zeros((b, units))
    feed = np.zeros((b, units))  # Luong input feeding: h̃_{t-1}
    logits, weights = [], []
    for step in range(t):
        e = w["embedding"][ids[:, step]]  # (B, E)
        if attention == "bahdanau":
            a = masked_softmax(bahdanau_scores(h, memory, w["attention"]), mask)
            context = np.einsum("bs,bsm->bm", a, memory)
            x = np.concatenate([e, context], -1)
            if cell == "gru":
                h = gru_cell(x, h, *w["cell"])
            else:
                h, c = lstm_cell(x, h, c, *w["cell"])
            out = np.concatenate([h, context], -1)
        else:
            x = np.concatenate([e, feed], -1)
            if cell == "gru":
                h = gru_cell(x, h, *w["cell"])
            else:
                h, c = lstm_cell(x, h, c, *w["cell"])
            a = masked_softmax(luong_scores(h, memory, w["attention"], score), mask)
            context = np.einsum("bs,bsm->bm", a, memory)
            out = feed = np.tanh(np.concatenate([context, h], -1) @ w["attentional"])
        kernel, bias = w["logits"]
        logits.append(out @ kernel + bias)
        weights.append(a)
    return np.stack(logits, 1), np.stack(weights, 1)


# ---------------------------------------------------------------- Transformer blocks
def layer_norm(x, gamma, beta, epsilon):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon) * gamma + beta


def dense(x, kernel, bias=None):
    y = x @ kernel
    return y if bias is None else y + bias


def feed_forward(x, w, activation="gelu"):
    """``W2 act(W1 x + b1) + b2``."""
    return dense(ACTIVATIONS[activation](dense(x, *w["hidden"])), *w["output"])


def multi_head_attention(query, value, w, mask=None, num_heads=None, num_kv_heads=None,
                         rotary_positions=None):
    """Projections + scaled dot-product attention + output projection, float64.

    ``w`` has ``query``/``key``/``value``/``output`` as ``(kernel, bias)``
    with kernels ``(D, H*hd)``, ``(D, Hkv*hd)``, ``(H*hd, D)`` (bias may be
    ``None``). ``mask``: bool broadcastable to ``(B, Tq, Tk)``.
    """
    from reference import rotary

    b, tq, _ = query.shape
    tk = value.shape[1]
    q = dense(query, *w["query"])
    k = dense(value, *w["key"])
    v = dense(value, *w["value"])
    num_kv_heads = num_kv_heads or num_heads
    head_dim = q.shape[-1] // num_heads
    q = q.reshape(b, tq, num_heads, head_dim)
    k = k.reshape(b, tk, num_kv_heads, head_dim)
    v = v.reshape(b, tk, num_kv_heads, -1)
    if rotary_positions is not None:
        q = rotary(q, rotary_positions[0])
        k = rotary(k, rotary_positions[1])
    groups = num_heads // num_kv_heads
    k = np.repeat(k, groups, axis=2)
    v = np.repeat(v, groups, axis=2)
    out = _attention(q, k, v, mask)  # (B, Tq, H, hd)
    return dense(out.reshape(b, tq, -1), *w["output"])


def decoder_block(x, memory, w, *, self_mask, cross_mask=None, norm_first=True,
                  activation="gelu", epsilon=1e-5, num_heads=None, num_kv_heads=None,
                  interaction="sequential", rotary_positions=None):
    """A Transformer decoder block, float64.

    ``sequential``: x + SA(x); x + CA(x, memory); x + FF(x).
    ``parallel``:   x + SA(x) + CA(x, memory); x + FF(x).
    ``joint``:      x + A(x, [memory; x]) with one set of weights; x + FF(x).
    Post-norm (``norm_first=False``) normalises after each residual sum.
    """
    heads = dict(num_heads=num_heads, num_kv_heads=num_kv_heads)

    def sub(x, name, fn):
        if norm_first:
            return x + fn(layer_norm(x, *w[f"{name}_norm"], epsilon))
        return layer_norm(x + fn(x), *w[f"{name}_norm"], epsilon)

    def self_attention(h):
        return multi_head_attention(h, h, w["self_attention"], self_mask,
                                    rotary_positions=rotary_positions, **heads)

    def cross_attention(h):
        return multi_head_attention(h, memory, w["cross_attention"], cross_mask, **heads)

    if memory is None or interaction == "sequential":
        x = sub(x, "self_attention", self_attention)
        if memory is not None:
            x = sub(x, "cross_attention", cross_attention)
    elif interaction == "parallel":
        x = sub(x, "self_attention", lambda h: self_attention(h) + cross_attention(h))
    elif interaction == "joint":
        def joint(h):
            keys = np.concatenate([memory, h], axis=1)
            mask = np.concatenate([np.broadcast_to(cross_mask, self_mask.shape[:-1]
                                                   + (memory.shape[1],)),
                                   np.broadcast_to(self_mask, self_mask.shape)], axis=-1)
            return multi_head_attention(h, keys, w["self_attention"], mask, **heads)
        x = sub(x, "self_attention", joint)
    x = sub(x, "feed_forward", lambda h: feed_forward(h, w["feed_forward"], activation))
    return x


def encoder_block(x, w, *, mask, norm_first=True, activation="gelu", epsilon=1e-5,
                  num_heads=None):
    def sub(x, name, fn):
        if norm_first:
            return x + fn(layer_norm(x, *w[f"{name}_norm"], epsilon))
        return layer_norm(x + fn(x), *w[f"{name}_norm"], epsilon)

    x = sub(x, "self_attention",
            lambda h: multi_head_attention(h, h, w["self_attention"], mask, num_heads=num_heads))
    return sub(x, "feed_forward", lambda h: feed_forward(h, w["feed_forward"], activation))


__all__ = [
    "causal_mask", "self_attention_mask", "gru_cell", "lstm_cell", "rnn_decoder", "rnn_decoder_weights",
    "layer_norm", "feed_forward", "multi_head_attention", "decoder_block", "encoder_block",
]


# ---------------------------------------------------------------- weights out of Keras layers
def mha_weights(layer):
    """``query``/``key``/``value``/``output`` as flat ``(kernel, bias)`` pairs.

    Works for ``keras_decoder.attention.MultiHeadAttention`` and
    ``keras.layers.MultiHeadAttention`` (same EinsumDense shapes).
    """
    def pair(dense, out=False):
        kernel = _np(dense.kernel)
        kernel = kernel.reshape(-1, kernel.shape[-1]) if out else kernel.reshape(kernel.shape[0], -1)
        bias = _np(dense.bias).reshape(-1) if dense.bias is not None else None
        return kernel, bias

    return {"query": pair(layer.query_dense), "key": pair(layer.key_dense),
            "value": pair(layer.value_dense), "output": pair(layer.output_dense, out=True)}


def norm_weights(layer):
    return _np(layer.gamma), _np(layer.beta)


def ff_weights(layer):
    return {"hidden": (_np(layer.hidden.kernel), _np(layer.hidden.bias)),
            "output": (_np(layer.output_dense.kernel), _np(layer.output_dense.bias))}


def block_weights(block):
    """All weights of an encoder or decoder block, keyed like :func:`decoder_block`."""
    w = {"self_attention": mha_weights(block.self_attention),
         "self_attention_norm": norm_weights(block.self_attention_norm),
         "feed_forward": ff_weights(block.feed_forward),
         "feed_forward_norm": norm_weights(block.feed_forward_norm)}
    if getattr(block, "cross_attention", None) is not None:
        w["cross_attention"] = mha_weights(block.cross_attention)
    if getattr(block, "cross_attention_norm", None) is not None:
        w["cross_attention_norm"] = norm_weights(block.cross_attention_norm)
    return w
