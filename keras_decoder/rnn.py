"""The RNN decoder with attention: the seed article's "RNN decoder".

Before Transformers, a decoder was a recurrent cell that reads one target
token at a time. Attention lets each step look back at the whole encoder
output ("memory") instead of one fixed vector. Two classic recipes:

* **Bahdanau** (additive, 2015): the *previous* decoder state asks the
  question, ``score(s, h) = vᵀ tanh(W s + U h)``; the context vector is fed
  *into* the cell together with the previous token.
* **Luong** (multiplicative, 2015): the cell runs first, then its *new* state
  asks the question with ``dot`` (``hᵀ h̄``), ``general`` (``hᵀ W h̄``) or
  ``concat`` (``vᵀ tanh(W [h; h̄])``); the attentional vector
  ``h̃ = tanh(W_c [c; h])`` is fed to the next step ("input feeding").

Shapes used below: ``B`` batch, ``T`` target length, ``S`` source (memory)
length, ``E`` embedding size, ``U`` cell units, ``M`` memory feature size,
``V`` vocabulary size.

The encoder padding mask (bool ``(B, S)``, ``True`` = real token) is honoured
in every score: a padded source position gets exactly zero attention weight,
and a row with no real source token gets a zero context vector (never NaN).
"""

import keras
from keras import ops

from keras_decoder.masks import large_negative

try:  # Keras keeps masks of JAX arrays (which take no attributes) on the side.
    from keras.src.backend.common.masking import get_keras_mask as _get_keras_mask
except ImportError:  # pragma: no cover
    def _get_keras_mask(x):
        return getattr(x, "_keras_mask", None)

__all__ = ["BahdanauAttention", "LuongAttention", "RNNDecoder"]

_PACKAGE = "keras_decoder"


def _masked_softmax(scores, mask):
    """Softmax over the last axis in float32, with ``mask`` (bool, broadcastable).

    Masked entries get exactly 0; a row with no ``True`` entry is all zeros.
    """
    scores = ops.cast(scores, "float32")
    if mask is None:
        return ops.softmax(scores, axis=-1)
    mask = ops.cast(mask, "bool")
    scores = ops.where(mask, scores, large_negative("float32"))
    weights = ops.softmax(scores, axis=-1)
    return weights * ops.cast(mask, "float32")  # zeroes fully masked rows


def _memory_mask(mask, memory):
    """Return the bool ``(B, 1, S)`` key mask, or ``None``; checks the shape."""
    if mask is None:
        return None
    mask = ops.convert_to_tensor(mask)
    if len(mask.shape) != 2:
        raise ValueError(
            "Expected a memory (encoder padding) mask of shape (batch, source_len). "
            f"Received: mask.shape={tuple(mask.shape)}, memory.shape={tuple(memory.shape)}"
        )
    for got, want in zip(mask.shape, memory.shape[:2]):
        if got is not None and want is not None and got != want:
            raise ValueError(
                "Expected a memory mask of shape (batch, source_len) = "
                f"{tuple(memory.shape[:2])}. Received: mask.shape={tuple(mask.shape)}"
            )
    return ops.expand_dims(ops.cast(mask, "bool"), 1)  # (B, 1, S)


class _RNNAttention(keras.layers.Layer):
    """Common plumbing: ``score`` is the only thing a subclass defines.

    ``call(query, value, mask)`` = ``attend(query, project_keys(value), value, mask)``.
    The decoder projects the memory once with :meth:`project_keys` and then
    calls :meth:`attend` at every step.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def project_keys(self, value):
        """``(B, S, M)`` memory → ``(B, S, K)`` keys, ready for :meth:`score`."""
        return value

    def score(self, query, keys):
        """``(B, Tq, Dq)``, ``(B, S, K)`` → unnormalised scores ``(B, Tq, S)``."""
        raise NotImplementedError

    def attend(self, query, keys, value, mask=None):
        """Attention with keys already projected.

        Args:
            query: ``(B, Dq)`` (one decoder step) or ``(B, Tq, Dq)``.
            keys: ``(B, S, K)`` from :meth:`project_keys`.
            value: ``(B, S, M)``, the memory.
            mask: bool ``(B, S)``, ``True`` = real source token, or ``None``.

        Returns:
            ``(context, weights)``: ``(B, [Tq,] M)`` and ``(B, [Tq,] S)``.
        """
        single = len(query.shape) == 2
        if single:
            query = ops.expand_dims(query, 1)  # (B, 1, Dq)
        scores = self.score(query, keys)  # (B, Tq, S)
        weights = _masked_softmax(scores, _memory_mask(mask, value))  # float32
        weights = ops.cast(weights, self.compute_dtype)
        context = ops.matmul(weights, value)  # (B, Tq, S) @ (B, S, M) -> (B, Tq, M)
        if single:
            context, weights = context[:, 0], weights[:, 0]
        return context, weights

    def call(self, query, value, mask=None, return_attention_scores=False):
        """Attend from ``query`` over ``value`` (the memory).

        Args:
            query: ``(B, Dq)`` or ``(B, Tq, Dq)``: decoder state(s).
            value: ``(B, S, M)``: encoder outputs. Its Keras mask is used when
                ``mask`` is not given.
            mask: bool ``(B, S)``, ``True`` = real source token.
            return_attention_scores: also return the weights.

        Returns:
            context ``(B, [Tq,] M)``, and weights ``(B, [Tq,] S)`` on request.
        """
        if mask is None:
            mask = _get_keras_mask(value)
        context, weights = self.attend(query, self.project_keys(value), value, mask)
        return (context, weights) if return_attention_scores else context

    def compute_mask(self, query, value=None, mask=None, return_attention_scores=False):
        return None


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BahdanauAttention(_RNNAttention):
    """Additive attention (Bahdanau et al., 2015): ``vᵀ tanh(W q + U h)``.

    Args:
        units: size of the hidden layer inside the score.

    Sublayers: ``query`` (``W``), ``key`` (``U``), ``score`` (``v``); no biases,
    as in the paper.

    Example:
    ```python
    attention = BahdanauAttention(16)
    context, weights = attention(state, memory, mask=source_ids != 0,
                                 return_attention_scores=True)
    # state (B, U) -> context (B, M), weights (B, S)
    ```
    """

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        dense = dict(use_bias=False, dtype=self.dtype_policy)
        self.query_dense = keras.layers.Dense(self.units, name="query", **dense)
        self.key_dense = keras.layers.Dense(self.units, name="key", **dense)
        self.score_dense = keras.layers.Dense(1, name="score", **dense)

    def build(self, query_shape, value_shape=None, *args, **kwargs):
        value_shape = query_shape if value_shape is None else value_shape
        self.query_dense.build(tuple(query_shape))
        self.key_dense.build(tuple(value_shape))
        self.score_dense.build((None, self.units))
        self.built = True

    def project_keys(self, value):
        return self.key_dense(value)  # (B, S, units)

    def score(self, query, keys):
        q = self.query_dense(query)  # (B, Tq, units)
        hidden = ops.tanh(ops.expand_dims(q, 2) + ops.expand_dims(keys, 1))  # (B, Tq, S, units)
        return ops.squeeze(self.score_dense(hidden), -1)  # (B, Tq, S)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LuongAttention(_RNNAttention):
    """Multiplicative attention (Luong et al., 2015).

    Args:
        score: ``"dot"`` (``qᵀ h``; needs ``Dq == M``), ``"general"``
            (``qᵀ W h``) or ``"concat"`` (``vᵀ tanh(W [q; h])``, written as
            ``vᵀ tanh(W_q q + W_h h)``, the same function).
        units: hidden size of the ``concat`` score; defaults to ``Dq``.
            Ignored by ``dot`` and ``general``.

    Sublayers: ``key`` (``general``, ``concat``), ``query`` and ``score``
    (``concat``); no biases, as in the paper.
    """

    SCORES = ("dot", "general", "concat")

    def __init__(self, score="dot", units=None, **kwargs):
        super().__init__(**kwargs)
        if score not in self.SCORES:
            raise ValueError(f"Expected score in {self.SCORES}. Received: score={score!r}")
        self.score_kind = score
        self.units = None if units is None else int(units)
        self.query_dense = self.key_dense = self.score_dense = None
        dense = dict(use_bias=False, dtype=self.dtype_policy)
        if score == "concat":
            self.query_dense = keras.layers.Dense(units or 1, name="query", **dense)
            self.score_dense = keras.layers.Dense(1, name="score", **dense)
        if score in ("general", "concat"):
            self.key_dense = keras.layers.Dense(units or 1, name="key", **dense)

    def build(self, query_shape, value_shape=None, *args, **kwargs):
        value_shape = tuple(query_shape if value_shape is None else value_shape)
        query_dim = query_shape[-1]
        if self.score_kind == "dot" and value_shape[-1] != query_dim:
            raise ValueError(
                "Expected query and memory with the same feature size for the "
                f"'dot' score. Received: query_shape={tuple(query_shape)}, "
                f"value_shape={value_shape}"
            )
        # The key (and concat) sizes default to the query size: set them now.
        hidden = self.units or query_dim
        if self.score_kind == "general":
            self.key_dense.units = query_dim
        if self.score_kind == "concat":
            self.query_dense.units = self.key_dense.units = hidden
            self.query_dense.build(tuple(query_shape))
            self.score_dense.build((None, hidden))
        if self.key_dense is not None:
            self.key_dense.build(value_shape)
        self.built = True

    def project_keys(self, value):
        return value if self.key_dense is None else self.key_dense(value)

    def score(self, query, keys):
        if self.score_kind == "concat":
            q = self.query_dense(query)  # (B, Tq, units)
            hidden = ops.tanh(ops.expand_dims(q, 2) + ops.expand_dims(keys, 1))
            return ops.squeeze(self.score_dense(hidden), -1)  # (B, Tq, S)
        return ops.einsum("bqd,bsd->bqs", query, keys)  # (B, Tq, S)

    def get_config(self):
        return {**super().get_config(), "score": self.score_kind, "units": self.units}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RNNDecoder(keras.layers.Layer):
    """A recurrent decoder with attention over an encoder memory.

    One step, Bahdanau (``attention="bahdanau"``)::

        c_t, a_t = attention(query=h_{t-1}, memory)        # previous state asks
        h_t      = cell([embed(y_{t-1}); c_t], state_{t-1})
        out_t    = [h_t; c_t]                               # (B, U + M)

    One step, Luong (``attention="luong"``, with input feeding)::

        h_t      = cell([embed(y_{t-1}); h̃_{t-1}], state_{t-1})
        c_t, a_t = attention(query=h_t, memory)             # new state asks
        h̃_t      = tanh(W_c [c_t; h_t])                     # (B, U), fed to t+1
        out_t    = h̃_t

    and ``logits_t = W_out out_t + b`` (``(B, V)``).

    Args:
        vocab_size: ``V``.
        embed_dim: ``E``, the target token embedding size.
        units: ``U``, the cell size.
        attention: ``"bahdanau"`` or ``"luong"``.
        cell: ``"gru"`` or ``"lstm"`` (Keras ``GRUCell`` / ``LSTMCell``).
        score: the Luong score, ``"dot"``, ``"general"`` or ``"concat"``
            (``dot`` needs ``M == U``). Ignored for Bahdanau.
        attention_units: hidden size of the additive (Bahdanau, Luong concat)
            score; defaults to ``units``.

    Sublayers: ``token_embedding``, ``attention``, ``cell``, ``attentional``
    (Luong only), ``logits``.

    Call arguments:
        decoder_input_ids: int ``(B, T)``, the teacher-forced inputs
            (``shift_right`` of the targets).
        memory: ``(B, S, M)`` encoder outputs.
        memory_mask: bool ``(B, S)``; defaults to the Keras mask of ``memory``.
            Padded source positions get zero attention.
        initial_state: optional list of cell states (``[h]`` for GRU,
            ``[h, c]`` for LSTM), each ``(B, U)``; zeros by default.
        return_attention_scores: also return the weights ``(B, T, S)``.

    Returns:
        logits ``(B, T, V)`` (and the weights ``(B, T, S)``).

    For generation, :meth:`get_initial_state` then :meth:`step` one token at a
    time gives the same logits as the teacher-forced call.

    The loop over time is a Python loop when ``T`` is static and at most
    ``UNROLL_MAX_LENGTH`` (64): fast eagerly, unrolled under ``jit_compile``.
    Longer or unknown lengths use ``keras.ops.scan`` (one compiled loop body).
    Both give the same numbers.
    """

    ATTENTIONS = ("bahdanau", "luong")
    CELLS = ("gru", "lstm")

    def __init__(self, vocab_size, embed_dim, units, attention="bahdanau", cell="gru",
                 score="general", attention_units=None, **kwargs):
        super().__init__(**kwargs)
        if attention not in self.ATTENTIONS:
            raise ValueError(
                f"Expected attention in {self.ATTENTIONS}. Received: attention={attention!r}"
            )
        if cell not in self.CELLS:
            raise ValueError(f"Expected cell in {self.CELLS}. Received: cell={cell!r}")
        self.vocab_size = int(vocab_size)
        self.embed_dim = int(embed_dim)
        self.units = int(units)
        self.attention_kind = attention
        self.cell_kind = cell
        self.score = score
        self.attention_units = None if attention_units is None else int(attention_units)
        policy = dict(dtype=self.dtype_policy)
        att_units = self.attention_units or self.units
        self.token_embedding = keras.layers.Embedding(
            self.vocab_size, self.embed_dim, name="token_embedding", **policy)
        if attention == "bahdanau":
            self.attention = BahdanauAttention(att_units, name="attention", **policy)
        else:
            self.attention = LuongAttention(
                score, units=self.attention_units, name="attention", **policy)
        cell_class = keras.layers.GRUCell if cell == "gru" else keras.layers.LSTMCell
        self.cell = cell_class(self.units, name="cell", **policy)
        self.attentional = None
        if attention == "luong":
            self.attentional = keras.layers.Dense(
                self.units, activation="tanh", use_bias=False, name="attentional", **policy)
        self.logits = keras.layers.Dense(self.vocab_size, name="logits", **policy)
        self.memory_dim = None

    # ------------------------------------------------------------------ build
    def build(self, decoder_input_ids_shape, memory_shape=None, *args, **kwargs):
        if memory_shape is None or len(memory_shape) != 3:
            raise ValueError(
                "Expected a memory of shape (batch, source_len, features). "
                f"Received: memory_shape={memory_shape}"
            )
        m, u, e = memory_shape[-1], self.units, self.embed_dim
        self.memory_dim = m
        self.token_embedding.build(tuple(decoder_input_ids_shape))
        self.attention.build((None, u), tuple(memory_shape))
        if self.attention_kind == "bahdanau":
            self.cell.build((None, e + m))
            out_dim = u + m
        else:
            self.cell.build((None, e + u))
            self.attentional.build((None, m + u))
            out_dim = u
        self.logits.build((None, None, out_dim))
        self.built = True

    # ------------------------------------------------------------------ state
    def _zeros(self, memory, size):
        return ops.zeros((ops.shape(memory)[0], size), dtype=self.compute_dtype)

    def get_initial_state(self, memory, initial_state=None):
        """The decoder state before the first token.

        Returns a dict: ``"cell"``, the list of cell states (``[h]`` or
        ``[h, c]``, each ``(B, U)``; zeros unless ``initial_state`` is given),
        and ``"output"``, the previous step's output (``(B, U)`` attentional
        vector for Luong input feeding, ``(B, U + M)`` for Bahdanau; zeros).
        """
        n_states = 1 if self.cell_kind == "gru" else 2
        if initial_state is None:
            cell = [self._zeros(memory, self.units) for _ in range(n_states)]
        else:
            cell = list(initial_state) if isinstance(initial_state, (list, tuple)) else [initial_state]
            if len(cell) != n_states:
                raise ValueError(
                    f"Expected {n_states} initial state tensor(s) for a {self.cell_kind} "
                    f"cell. Received: {len(cell)}"
                )
            cell = [ops.cast(s, self.compute_dtype) for s in cell]
        out_dim = self.units if self.attention_kind == "luong" else self.units + memory.shape[-1]
        return {"cell": cell, "output": self._zeros(memory, out_dim)}

    # ------------------------------------------------------------------- step
    def _step(self, state, embedded, keys, memory, mask, training=None):
        """One decoder step on embedded tokens ``(B, E)``.

        Returns ``(new_state, weights)``; ``new_state["output"]`` is what the
        ``logits`` layer reads.
        """
        cell_states = state["cell"]
        if self.attention_kind == "bahdanau":
            context, weights = self.attention.attend(cell_states[0], keys, memory, mask)
            h, new_cell = self.cell(ops.concatenate([embedded, context], -1), cell_states,
                                    training=training)
            output = ops.concatenate([h, context], -1)  # (B, U + M)
        else:
            x = ops.concatenate([embedded, state["output"]], -1)  # input feeding
            h, new_cell = self.cell(x, cell_states, training=training)
            context, weights = self.attention.attend(h, keys, memory, mask)
            output = self.attentional(ops.concatenate([context, h], -1))  # (B, U)
        new_cell = list(new_cell) if isinstance(new_cell, (list, tuple)) else [new_cell]
        return {"cell": new_cell, "output": output}, weights

    def step(self, token_ids, state, memory, memory_mask=None, return_attention_scores=False,
             training=None):
        """One generation step.

        Args:
            token_ids: int ``(B,)``, the previous token of each row.
            state: from :meth:`get_initial_state` or the previous ``step``.
            memory: ``(B, S, M)``; memory_mask: bool ``(B, S)`` or ``None``.

        Returns:
            ``(logits (B, V), new_state)``, plus weights ``(B, S)`` on request.
        """
        if memory_mask is None:
            memory_mask = _get_keras_mask(memory)
        embedded = self.token_embedding(token_ids)  # (B, E)
        keys = self.attention.project_keys(memory)
        new_state, weights = self._step(state, embedded, keys, memory, memory_mask, training)
        logits = self.logits(new_state["output"])  # (B, V)
        if return_attention_scores:
            return logits, new_state, weights
        return logits, new_state

    # ------------------------------------------------------------------- call
    def call(self, decoder_input_ids, memory, memory_mask=None, initial_state=None,
             return_attention_scores=False, training=None):
        if memory_mask is None:
            memory_mask = _get_keras_mask(memory)
        embedded = self.token_embedding(decoder_input_ids)  # (B, T, E)
        keys = self.attention.project_keys(memory)  # (B, S, K), once for all steps
        state = self.get_initial_state(memory, initial_state)

        length = embedded.shape[1]
        if isinstance(length, int) and length <= self.UNROLL_MAX_LENGTH:
            # A Python loop over a short static length: fast eagerly, unrolled
            # when compiled.
            outputs, weights = [], []
            for t in range(length):
                state, w = self._step(state, embedded[:, t], keys, memory, memory_mask,
                                      training)
                outputs.append(state["output"])
                weights.append(w)
            outputs = ops.stack(outputs, axis=1)  # (B, T, out_dim)
            weights = ops.stack(weights, axis=1)  # (B, T, S)
        else:
            outputs, weights = self._scan(state, embedded, keys, memory, memory_mask, training)
        logits = self.logits(outputs)  # (B, T, V)
        return (logits, weights) if return_attention_scores else logits

    UNROLL_MAX_LENGTH = 64

    def _scan(self, state, embedded, keys, memory, memory_mask, training):
        """The same loop with ``ops.scan`` (long or unknown lengths): one compiled body."""
        weights0 = ops.zeros((ops.shape(memory)[0], ops.shape(memory)[1]), self.compute_dtype)

        def body(carry, x_t):
            state, _ = carry
            new_state, weights = self._step(state, x_t, keys, memory, memory_mask, training)
            carry = (new_state, ops.cast(weights, self.compute_dtype))
            return carry, carry  # TensorFlow's scan wants ys shaped like the carry

        time_major = ops.transpose(embedded, (1, 0, 2))  # (T, B, E)
        _, (states, weights) = ops.scan(body, (state, weights0), time_major)
        outputs = ops.transpose(states["output"], (1, 0, 2))  # (B, T, out_dim)
        return outputs, ops.transpose(weights, (1, 0, 2))  # (B, T, S)

    def compute_output_spec(self, decoder_input_ids, memory, memory_mask=None,
                            initial_state=None, return_attention_scores=False, training=None):
        """Shapes without tracing the loop: ``(B, T, V)`` (and ``(B, T, S)``)."""
        batch, length = decoder_input_ids.shape[:2]
        logits = keras.KerasTensor((batch, length, self.vocab_size), dtype=self.compute_dtype)
        if return_attention_scores:
            weights = keras.KerasTensor((batch, length, memory.shape[1]), dtype=self.compute_dtype)
            return logits, weights
        return logits

    def compute_mask(self, *args, **kwargs):
        return None

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "embed_dim": self.embed_dim,
            "units": self.units,
            "attention": self.attention_kind,
            "cell": self.cell_kind,
            "score": self.score,
            "attention_units": self.attention_units,
        }
