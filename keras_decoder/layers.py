"""Transformer blocks: the feed-forward network, the encoder block, the decoder block.

A block is a few *sublayers*, each wrapped in a residual connection and a
layer norm. With ``norm_first=True`` (pre-norm, GPT-2 and most modern models)::

    x = x + Dropout(Sublayer(LayerNorm(x)))

With ``norm_first=False`` (post-norm, the original Transformer and BERT)::

    x = LayerNorm(x + Dropout(Sublayer(x)))

The decoder block has up to three sublayers: causal self-attention,
cross-attention to the encoder memory (the seed article's 交互 "interaction"),
and the feed-forward network. ``interaction`` chooses how the first two meet
(see :class:`keras_decoder.attention.InteractingAttention`):

* ``"sequential"``: self-attention, then cross-attention (the standard decoder);
* ``"parallel"``: ``x + SelfAttn(LN(x)) + CrossAttn(LN(x), memory)``;
* ``"joint"``: one attention over ``[memory; x]``: memory and the decoder's
  past compete in one softmax.

Shapes: ``B`` batch, ``T`` decoder (or encoder) length, ``S`` encoder length,
``C`` model width (``dim``), ``H`` heads, ``Hkv`` key/value heads,
``D = C // H`` head size, ``L`` cache length (``max_length``).

Stable weight paths (for ``keras.distribution.LayoutMap`` and LoRA), e.g. in a
block named ``decoder_block_0``::

    decoder_block_0/self_attention/{query,key,value,attention_output}/{kernel,bias}
    decoder_block_0/cross_attention/{query,key,value,attention_output}/{kernel,bias}
    decoder_block_0/feed_forward/{hidden,output}/{kernel,bias}
    decoder_block_0/{self_attention,cross_attention,feed_forward}_norm/{gamma,beta}
"""

import keras
from keras import ops

from keras_decoder._calls import call_layer
from keras_decoder.attention import MultiHeadAttention

try:  # Keras keeps masks of JAX arrays (which take no attributes) on the side.
    from keras.src.backend.common.masking import get_keras_mask as _get_keras_mask
except ImportError:  # pragma: no cover
    def _get_keras_mask(x):
        return getattr(x, "_keras_mask", None)

__all__ = ["FeedForward", "TransformerEncoderBlock", "TransformerDecoderBlock"]

_PACKAGE = "keras_decoder"
INTERACTIONS = ("sequential", "parallel", "joint")


def _key_mask(padding_mask):
    """bool ``(B, Tk)`` → ``(B, 1, Tk)``: every query sees the same keys."""
    if padding_mask is None:
        return None
    return ops.expand_dims(ops.cast(padding_mask, "bool"), 1)


def _and(a, b):
    """Logical AND of two broadcastable bool masks; ``None`` means "no mask".

    (Shapes are checked by the attention layer, which receives the result.)
    """
    if a is None or b is None:
        return b if a is None else a
    return ops.logical_and(ops.cast(a, "bool"), ops.cast(b, "bool"))


def _causal(length):
    """The ``(T, T)`` lower triangle, for a length known only at run time."""
    steps = ops.arange(length, dtype="int32")
    return ops.less_equal(steps[None, :], steps[:, None])


def _head_dim(dim, num_heads):
    if dim % num_heads:
        raise ValueError(
            f"Expected dim to be a multiple of num_heads. Received: dim={dim}, "
            f"num_heads={num_heads}"
        )
    return dim // num_heads


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FeedForward(keras.layers.Layer):
    """Position-wise feed-forward network: ``Dropout(W2 act(W1 x + b1) + b2)``.

    Args:
        dim: ``C``, the input and output width.
        hidden_dim: the inner width (usually ``4 * C``).
        activation: of the hidden layer (``"gelu"``, exact erf form, or
            ``"relu"`` as in the original Transformer and KerasHub).
        dropout: on the output.

    Sublayers: ``hidden`` (``(C, hidden_dim)``), ``output`` (``(hidden_dim, C)``).

    Call: ``(B, T, C)`` → ``(B, T, C)``; the Keras mask passes through.
    """

    def __init__(self, dim, hidden_dim, activation="gelu", dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.hidden_dim = int(hidden_dim)
        self.activation = activation
        self.dropout = float(dropout)
        self.supports_masking = True
        self.hidden = keras.layers.Dense(self.hidden_dim, activation=activation, name="hidden",
                                         dtype=self.dtype_policy)
        self.output_dense = keras.layers.Dense(self.dim, name="output", dtype=self.dtype_policy)
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy,
                                                  name="dropout")

    def build(self, inputs_shape):
        if inputs_shape[-1] != self.dim:
            raise ValueError(
                f"Expected inputs of shape (batch, seq_len, {self.dim}). "
                f"Received: inputs.shape={tuple(inputs_shape)}"
            )
        self.hidden.build(inputs_shape)
        self.output_dense.build(tuple(inputs_shape[:-1]) + (self.hidden_dim,))
        self.built = True

    def call(self, inputs, training=None):
        x = call_layer(self.hidden, inputs)  # (B, T, hidden_dim)
        x = call_layer(self.output_dense, x)  # (B, T, C)
        return call_layer(self.dropout_layer, x, training=training)

    def compute_output_shape(self, inputs_shape):
        return inputs_shape

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "hidden_dim": self.hidden_dim,
                "activation": self.activation, "dropout": self.dropout}


class _Block(keras.layers.Layer):
    """Shared plumbing: residual sublayers with pre- or post-norm."""

    def __init__(self, dim, num_heads, ff_dim, dropout=0.0, norm_first=True, activation="gelu",
                 layer_norm_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.num_heads = int(num_heads)
        self.ff_dim = int(ff_dim)
        self.dropout = float(dropout)
        self.norm_first = bool(norm_first)
        self.activation = activation
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.head_dim = _head_dim(self.dim, self.num_heads)
        self.supports_masking = True
        self.feed_forward = FeedForward(self.dim, self.ff_dim, activation, self.dropout,
                                        name="feed_forward", dtype=self.dtype_policy)
        self.feed_forward_norm = self._norm("feed_forward_norm")

    def _norm(self, name):
        return keras.layers.LayerNormalization(epsilon=self.layer_norm_epsilon, name=name,
                                               dtype=self.dtype_policy)

    def _dropout(self, name):
        return keras.layers.Dropout(self.dropout, name=name, dtype=self.dtype_policy)

    def _residual(self, x, norm, sublayer, dropout=None, training=None):
        """``x + Dropout(f(LN(x)))`` (pre-norm) or ``LN(x + Dropout(f(x)))`` (post-norm)."""
        y = sublayer(call_layer(norm, x) if self.norm_first else x)
        if dropout is not None:
            y = call_layer(dropout, y, training=training)
        x = ops.add(x, y)
        return x if self.norm_first else call_layer(norm, x)

    def _feed_forward(self, x, training):
        return self._residual(x, self.feed_forward_norm,
                              lambda h: call_layer(self.feed_forward, h, training=training))

    def compute_output_shape(self, inputs_shape, *args, **kwargs):
        return inputs_shape

    def get_config(self):
        return {
            **super().get_config(),
            "dim": self.dim,
            "num_heads": self.num_heads,
            "ff_dim": self.ff_dim,
            "dropout": self.dropout,
            "norm_first": self.norm_first,
            "activation": self.activation,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TransformerEncoderBlock(_Block):
    """Bidirectional self-attention + feed-forward, each residual and normalised.

    Args:
        dim: ``C``. num_heads: ``H`` (``C % H == 0``, head size ``C // H``).
        ff_dim: inner width of the feed-forward network.
        dropout: on attention weights and on each sublayer output.
        norm_first: pre-norm (``True``) or post-norm (``False``, as
            ``keras_hub.layers.TransformerEncoder``'s default).
        activation: of the feed-forward network.
        layer_norm_epsilon: ``1e-5`` (PyTorch and KerasHub; Keras's
            ``LayerNormalization`` defaults to ``1e-3``).

    Sublayers: ``self_attention``, ``self_attention_norm``, ``feed_forward``,
    ``feed_forward_norm``.

    Call arguments:
        inputs: ``(B, T, C)``.
        padding_mask: bool ``(B, T)``, ``True`` = real token; defaults to the
            Keras mask of ``inputs``. Padded keys are never attended.
        attention_mask: optional extra bool mask ``(B, T, T)``.

    Returns:
        ``(B, T, C)``, carrying the input's Keras mask.
    """

    def __init__(self, dim, num_heads, ff_dim, dropout=0.0, norm_first=True, **kwargs):
        super().__init__(dim, num_heads, ff_dim, dropout, norm_first, **kwargs)
        self.self_attention = MultiHeadAttention(
            self.num_heads, self.head_dim, dropout=self.dropout, name="self_attention",
            dtype=self.dtype_policy)
        self.self_attention_norm = self._norm("self_attention_norm")
        self.self_attention_dropout = self._dropout("self_attention_dropout")

    def build(self, inputs_shape, *args, **kwargs):
        inputs_shape = tuple(inputs_shape)
        self.self_attention.build(inputs_shape, inputs_shape)
        for norm in (self.self_attention_norm, self.feed_forward_norm):
            norm.build(inputs_shape)
        self.feed_forward.build(inputs_shape)
        self.built = True

    def call(self, inputs, padding_mask=None, attention_mask=None, training=None):
        if padding_mask is None:
            padding_mask = _get_keras_mask(inputs)
        mask = _and(attention_mask, _key_mask(padding_mask))  # (B, T|1, T)

        def attend(h):
            return self.self_attention(h, h, attention_mask=mask, training=training)

        x = self._residual(inputs, self.self_attention_norm, attend,
                           self.self_attention_dropout, training)
        return self._feed_forward(x, training)  # (B, T, C)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TransformerDecoderBlock(_Block):
    """Causal self-attention, cross-attention (optional), feed-forward.

    Args:
        dim: ``C``. num_heads: ``H``. ff_dim: feed-forward inner width.
        dropout: on attention weights and on each sublayer output.
        norm_first: pre-norm (``True``) or post-norm (``False``, as
            ``keras_hub.layers.TransformerDecoder``'s default).
        cross_attention: whether there is an encoder memory to attend to.
            ``False`` gives a GPT-style block.
        interaction: ``"sequential"``, ``"parallel"`` or ``"joint"`` (module
            docstring). Only with ``cross_attention=True``.
        num_kv_heads: ``Hkv`` for grouped-query attention (default ``H``).
        rotary: RoPE in the self-attention (not with ``"joint"``: the memory
            has no decoder positions).
        activation, layer_norm_epsilon: as :class:`TransformerEncoderBlock`.

    Sublayers: ``self_attention`` (``joint_attention`` for ``"joint"``),
    ``cross_attention`` (``"sequential"``, ``"parallel"``), ``feed_forward``,
    and a ``*_norm`` per residual sublayer.

    Call arguments:
        inputs: ``(B, T, C)`` decoder states.
        memory: ``(B, S, C)`` encoder output (with ``cross_attention``).
        padding_mask: bool decoder key padding, ``True`` = real: ``(B, T)``,
            or ``(B, L)`` for the whole cache when a cache is given. Defaults
            to the Keras mask of ``inputs``.
        memory_mask: bool ``(B, S)`` encoder padding; defaults to the Keras
            mask of ``memory``.
        attention_mask: optional extra bool self-attention mask ``(B, T, T)``
            (``(B, T, L)`` with a cache).
        use_causal_mask: ``True`` (default). ``False`` lets position ``t`` see
            the future: only for experiments (the leakage audit catches it).
        self_attention_cache: ``(key, value)``, each ``(B, L, Hkv, D)``, from
            :meth:`init_cache`. The new keys/values are written at
            ``cache_index``.
        cross_attention_cache: the projected memory from :meth:`memory_cache`
            (computed once per generation); ``memory`` is then not needed.
        cache_index: scalar int: the position of ``inputs[:, 0]``.

    Returns:
        ``(B, T, C)``; with ``self_attention_cache``, ``(outputs, new_cache)``.
    """

    def __init__(self, dim, num_heads, ff_dim, dropout=0.0, norm_first=True,
                 cross_attention=True, interaction="sequential", num_kv_heads=None,
                 rotary=False, **kwargs):
        super().__init__(dim, num_heads, ff_dim, dropout, norm_first, **kwargs)
        if interaction not in INTERACTIONS:
            raise ValueError(
                f"Expected interaction in {INTERACTIONS}. Received: interaction={interaction!r}")
        if rotary and cross_attention and interaction == "joint":
            raise ValueError(
                "Expected rotary=False with interaction='joint': the memory keys have "
                "no decoder positions to rotate by. Received: rotary=True")
        self.has_cross_attention = bool(cross_attention)
        self.interaction = interaction
        self.num_kv_heads = num_kv_heads
        self.rotary = bool(rotary)
        self.joint = self.has_cross_attention and interaction == "joint"
        attention = dict(num_kv_heads=num_kv_heads, dropout=self.dropout,
                         dtype=self.dtype_policy)
        self.self_attention = MultiHeadAttention(
            self.num_heads, self.head_dim, rotary=self.rotary,
            name="joint_attention" if self.joint else "self_attention", **attention)
        self.self_attention_norm = self._norm("self_attention_norm")
        self.self_attention_dropout = self._dropout("self_attention_dropout")
        self.cross_attention = self.cross_attention_norm = None
        if self.has_cross_attention and not self.joint:
            self.cross_attention = MultiHeadAttention(
                self.num_heads, self.head_dim, name="cross_attention", **attention)
            if interaction == "sequential":
                self.cross_attention_norm = self._norm("cross_attention_norm")
                self.cross_attention_dropout = self._dropout("cross_attention_dropout")

    # ------------------------------------------------------------------ build
    def build(self, inputs_shape, memory_shape=None, *args, **kwargs):
        inputs_shape = tuple(inputs_shape)
        if self.has_cross_attention and memory_shape is None:
            memory_shape = inputs_shape  # memory of width C (e.g. built for a cached call)
        if self.joint:
            if memory_shape[-1] != self.dim:
                raise ValueError(
                    f"Expected a memory of width dim={self.dim} for joint attention (it "
                    f"shares the key/value projections). Received: memory.shape={memory_shape}")
            self.self_attention.build(inputs_shape, (inputs_shape[0], None, self.dim))
        else:
            self.self_attention.build(inputs_shape, inputs_shape)
        if self.cross_attention is not None:
            self.cross_attention.build(inputs_shape, tuple(memory_shape))
        for norm in (self.self_attention_norm, self.cross_attention_norm, self.feed_forward_norm):
            if norm is not None:
                norm.build(inputs_shape)
        self.feed_forward.build(inputs_shape)
        self.built = True

    # ------------------------------------------------------------------ cache
    def init_cache(self, batch_size, max_length, dtype=None):
        """An empty self-attention cache ``(key, value)``, each ``(B, L, Hkv, D)``."""
        return self.self_attention.init_cache(batch_size, max_length, dtype=dtype)

    def memory_cache(self, memory):
        """Project the memory once: ``(key, value)``, each ``(B, S, Hkv, D)``.

        Pass it as ``cross_attention_cache`` at every generation step.
        """
        if not self.has_cross_attention:
            raise ValueError("This block has no cross-attention (cross_attention=False).")
        attention = self.self_attention if self.joint else self.cross_attention
        return attention.key_dense(memory), attention.value_dense(memory)

    # ------------------------------------------------------------------- call
    def call(self, inputs, memory=None, padding_mask=None, memory_mask=None, attention_mask=None,
             use_causal_mask=True, self_attention_cache=None, cross_attention_cache=None,
             cache_index=None, training=None):
        cached = self_attention_cache is not None
        if cached and cache_index is None:
            raise ValueError("Expected `cache_index` with `self_attention_cache`. "
                             "Received: cache_index=None")
        if self.has_cross_attention and memory is None and cross_attention_cache is None:
            raise ValueError("Expected `memory` (or `cross_attention_cache`) for a block with "
                             "cross-attention. Received: memory=None")
        if not self.has_cross_attention and (memory is not None
                                             or cross_attention_cache is not None):
            raise ValueError("This block was built with cross_attention=False. "
                             "Received: a memory")
        if padding_mask is None and not cached:
            padding_mask = _get_keras_mask(inputs)
        if memory_mask is None and memory is not None:
            memory_mask = _get_keras_mask(memory)
        self_mask = _and(attention_mask, _key_mask(padding_mask))  # (B, T|1, Tk)
        memory_key_mask = _key_mask(memory_mask)  # (B, 1, S)

        new_cache = None
        if self.joint:
            x, new_cache = self._joint_sublayer(inputs, memory, self_mask, memory_key_mask,
                                                use_causal_mask, self_attention_cache,
                                                cross_attention_cache, cache_index, training)
        else:
            def self_attend(h):
                nonlocal new_cache
                out = call_layer(
                    self.self_attention,
                    h, h, attention_mask=self_mask, use_causal_mask=use_causal_mask,
                    cache=self_attention_cache, cache_index=cache_index, training=training)
                if cached:
                    out, new_cache = out
                return out  # (B, T, C)

            def cross_attend(h):
                out = call_layer(
                    self.cross_attention,
                    h, h if memory is None else memory, attention_mask=memory_key_mask,
                    cache=cross_attention_cache, training=training)  # (B, T, C)
                return out if cross_attention_cache is None else out[0]  # read-only cache

            if self.has_cross_attention and self.interaction == "parallel":
                x = self._residual(inputs, self.self_attention_norm,
                                   lambda h: ops.add(self_attend(h), cross_attend(h)),
                                   self.self_attention_dropout, training)
            else:
                x = self._residual(inputs, self.self_attention_norm, self_attend,
                                   self.self_attention_dropout, training)
                if self.has_cross_attention:
                    x = self._residual(x, self.cross_attention_norm, cross_attend,
                                       self.cross_attention_dropout, training)
        x = self._feed_forward(x, training)  # (B, T, C)
        return (x, new_cache) if cached else x

    def _joint_sublayer(self, inputs, memory, self_mask, memory_key_mask, causal, cache,
                        memory_cache, cache_index, training):
        """One attention of the decoder over ``[memory; decoder]`` (one softmax)."""
        attention = self.self_attention
        length = inputs.shape[1]
        new_cache = None

        def attend(h):
            nonlocal new_cache
            if cache is None and memory_cache is None:
                keys = ops.concatenate([ops.cast(memory, h.dtype), h], axis=1)  # (B, S + T, C)
                own = _causal(ops.shape(h)[1]) if causal else None  # (T, T)
                own = _and(own, self_mask)
                return attention(h, keys, attention_mask=self._joint_mask(
                    memory_key_mask, own, ops.shape(h)[0], ops.shape(memory)[1],
                    ops.shape(h)[1]), training=training)
            memory_k, memory_v = (memory_cache if memory_cache is not None
                                  else self.memory_cache(memory))
            k, v = call_layer(attention.key_dense, h), call_layer(attention.value_dense, h)  # (B, T, Hkv, D)
            if cache is None:  # memory cached, decoder not: keys are [memory; h]
                keys_k, keys_v, own_len = k, v, length
                own = _causal(ops.shape(h)[1]) if causal else None
            else:  # write the new keys at cache_index, attend over the whole cache
                new_cache, key_cache, value_cache = attention._update_cache(
                    tuple(cache), k, v, cache_index)
                keys_k, keys_v, own_len = key_cache, value_cache, key_cache.shape[1]
                query_pos = ops.arange(length, dtype="int32") + cache_index
                key_pos = ops.arange(own_len, dtype="int32")
                if causal:  # key j is visible to query i iff j <= cache_index + i
                    own = ops.less_equal(key_pos[None, :], query_pos[:, None])  # (T, L)
                else:  # every written key
                    own = ops.less(key_pos[None, :], cache_index + length)[None]  # (1, L)
            own = _and(own, self_mask)
            both = (ops.concatenate([ops.cast(memory_k, keys_k.dtype), keys_k], axis=1),
                    ops.concatenate([ops.cast(memory_v, keys_v.dtype), keys_v], axis=1))
            mask = self._joint_mask(memory_key_mask, own, ops.shape(h)[0],
                                    ops.shape(memory_k)[1], ops.shape(h)[1])
            out, _ = call_layer(attention, h, h, attention_mask=mask, cache=both,
                                training=training)
            return out  # (B, T, C)

        x = self._residual(inputs, self.self_attention_norm, attend,
                           self.self_attention_dropout, training)
        return x, new_cache

    @staticmethod
    def _joint_mask(memory_key_mask, own, batch, memory_len, length):
        """``[memory part (B, T, S); decoder part (B, T, Tk)]`` → ``(B, T, S + Tk)``."""
        if memory_key_mask is None:
            memory_key_mask = ops.ones((batch, 1, memory_len), dtype="bool")
        memory_part = ops.broadcast_to(memory_key_mask, (batch, length, memory_len))
        if own is None:
            own = ops.ones((1, length, length), dtype="bool")
        own = own if len(own.shape) == 3 else ops.expand_dims(own, 0)
        own = ops.broadcast_to(own, (batch, length, ops.shape(own)[-1]))
        return ops.concatenate([memory_part, own], axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "cross_attention": self.has_cross_attention,
            "interaction": self.interaction,
            "num_kv_heads": self.num_kv_heads,
            "rotary": self.rotary,
        }
