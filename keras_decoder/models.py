"""Two whole models, each readable in one sitting.

* :class:`DecoderOnlyLM`: GPT-style. Token ids in, next-token logits out;
  causal self-attention only.
* :class:`Seq2SeqTransformer`: the original encoder-decoder Transformer.
  The encoder reads the source bidirectionally; the decoder reads the shifted
  target causally and attends to the encoder output (cross-attention).

Both mask padding (``pad_id``, 0 by default) as *keys*: no real token ever
attends to a pad. Both return float32 logits without a Keras mask (the loss
mask is the caller's ``sample_weight``).

Shapes: ``B`` batch, ``T`` target length, ``S`` source length, ``C`` width
(``dim``), ``V`` vocabulary, ``L`` cache length.

Generation with a KV cache (static shapes, one compiled step for every
position)::

    cache = model.init_cache(batch_size, max_length)   # Seq2Seq: also encoder_input_ids=
    logits, cache = model.call_with_cache(prompt, cache, cache_index=0)
    for i in range(prompt_len, ...):
        logits, cache = model.call_with_cache(next_ids, cache, cache_index=i)

A cache is a dict of tensors (a pytree):

* ``"self_attention"``: a list, one ``(key, value)`` per decoder block, each
  ``(B, L, Hkv, D)``;
* ``"padding"``: bool ``(B, L)``, ``True`` where a real token was written;
* Seq2Seq only: ``"cross_attention"``, a list of one ``(key, value)`` per
  block, each ``(B, S, Hkv, D)``: the encoder memory projected **once**; and
  ``"memory_mask"``, bool ``(B, S)``.
"""

import keras
from keras import ops

from keras_decoder._calls import call_layer
from keras_decoder.inputs import TokenAndPositionEmbedding
from keras_decoder.layers import TransformerDecoderBlock, TransformerEncoderBlock

try:
    from keras.src.backend.common.masking import set_keras_mask as _set_keras_mask
except ImportError:  # pragma: no cover
    def _set_keras_mask(x, mask):
        return None

__all__ = ["DecoderOnlyLM", "Seq2SeqTransformer"]

_PACKAGE = "keras_decoder"
_LM_POSITIONS = ("learned", "sinusoidal", "rotary")
_SEQ2SEQ_POSITIONS = ("learned", "sinusoidal")


def _without_mask(x):
    """Logits carry no Keras mask: Keras would silently re-weight the loss."""
    _set_keras_mask(x, None)
    return x


def _write_padding(padding, token_ids, cache_index, pad_id):
    """Mark the new tokens' padding in the cache's ``(B, L)`` bool padding."""
    new = ops.cast(ops.not_equal(token_ids, pad_id), "int32")  # (B, Tq)
    padding = ops.slice_update(ops.cast(padding, "int32"), (0, cache_index), new)
    return ops.not_equal(padding, 0)


class _LogitsMixin:
    """The output projection: tied to the token table, or a ``lm_head`` Dense."""

    def _logits(self, x, embedding):
        if self.tie_embeddings:
            table = ops.cast(embedding.embeddings, x.dtype)  # (V, C)
            logits = ops.einsum("btc,vc->btv", x, table)  # (B, T, V)
        else:
            logits = call_layer(self.lm_head, x)  # (B, T, V)
        return _without_mask(ops.cast(logits, "float32"))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DecoderOnlyLM(_LogitsMixin, keras.Model):
    """A GPT-style language model.

    ``embedding → num_layers × TransformerDecoderBlock (pre-norm, causal) →
    final_norm → logits``.

    Args:
        vocab_size: ``V``.
        max_length: the longest sequence (learned positions, and the default
            cache length).
        dim: ``C``. num_heads: ``H``. ff_dim: feed-forward inner width.
        num_layers: number of decoder blocks.
        num_kv_heads: ``Hkv`` for grouped-query attention (default ``H``).
        position: ``"learned"`` (a position table), ``"sinusoidal"``, or
            ``"rotary"`` (RoPE inside self-attention, no position table).
        tie_embeddings: logits are ``x @ token_table.T`` (no ``lm_head``).
        dropout: everywhere a Transformer has dropout.
        pad_id: padding id, masked as keys.
        activation, layer_norm_epsilon: of the blocks.

    Call arguments:
        token_ids: int ``(B, T)``.
        start_index: int scalar or ``(B,)``: position of the first token
            (left-padded rows). Learned/sinusoidal positions only.

    Returns:
        float32 logits ``(B, T, V)``; ``logits[:, t]`` predicts token ``t + 1``.

    Sublayers (stable weight paths): ``embedding`` (with ``token_embedding``
    and ``position_embedding``), ``decoder_block_{i}``, ``final_norm``,
    ``lm_head`` (untied only).
    """

    def __init__(self, vocab_size, max_length, dim, num_heads, ff_dim, num_layers,
                 num_kv_heads=None, position="learned", tie_embeddings=True, dropout=0.0,
                 pad_id=0, activation="gelu", layer_norm_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        if position not in _LM_POSITIONS:
            raise ValueError(f"Expected position in {_LM_POSITIONS}. Received: position={position!r}")
        self.vocab_size, self.max_length = int(vocab_size), int(max_length)
        self.dim, self.num_heads, self.ff_dim = int(dim), int(num_heads), int(ff_dim)
        self.num_layers, self.num_kv_heads = int(num_layers), num_kv_heads
        self.position, self.tie_embeddings = position, bool(tie_embeddings)
        self.dropout, self.pad_id = float(dropout), int(pad_id)
        self.activation, self.layer_norm_epsilon = activation, float(layer_norm_epsilon)
        policy = dict(dtype=self.dtype_policy)
        self.embedding = TokenAndPositionEmbedding(
            self.vocab_size, self.max_length, self.dim,
            position="none" if position == "rotary" else position, pad_id=self.pad_id,
            name="embedding", **policy)
        self.embedding_dropout = keras.layers.Dropout(self.dropout, name="embedding_dropout",
                                                      **policy)
        self.blocks = [
            TransformerDecoderBlock(
                self.dim, self.num_heads, self.ff_dim, dropout=self.dropout, norm_first=True,
                cross_attention=False, num_kv_heads=num_kv_heads, rotary=position == "rotary",
                activation=activation, layer_norm_epsilon=self.layer_norm_epsilon,
                name=f"decoder_block_{i}", **policy)
            for i in range(self.num_layers)
        ]
        self.final_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, name="final_norm", **policy)
        self.lm_head = None
        if not self.tie_embeddings:
            self.lm_head = keras.layers.Dense(self.vocab_size, name="lm_head", **policy)

    def build(self, token_ids_shape):
        token_ids_shape = tuple(token_ids_shape)
        hidden = token_ids_shape + (self.dim,)
        self.embedding.build(token_ids_shape)
        for block in self.blocks:
            block.build(hidden)
        self.final_norm.build(hidden)
        if self.lm_head is not None:
            self.lm_head.build(hidden)
        self.built = True

    def call(self, token_ids, start_index=0, training=None):
        x = self.embedding(token_ids, start_index=start_index)  # (B, T, C)
        x = self.embedding_dropout(x, training=training)
        padding = ops.not_equal(token_ids, self.pad_id)  # (B, T) keys
        for block in self.blocks:
            x = block(x, padding_mask=padding, training=training)  # (B, T, C)
        return self._logits(self.final_norm(x), self.embedding)  # (B, T, V)

    def compute_mask(self, *args, **kwargs):
        return None

    # ------------------------------------------------------------- the cache
    def init_cache(self, batch_size, max_length=None, dtype=None):
        """An empty cache for ``batch_size`` rows of up to ``max_length`` tokens.

        ``max_length`` defaults to the model's; beyond it, learned positions
        have no entry (rotary positions do).
        """
        max_length = self.max_length if max_length is None else int(max_length)
        return {
            "self_attention": [block.init_cache(batch_size, max_length, dtype)
                               for block in self.blocks],
            "padding": ops.zeros((batch_size, max_length), dtype="bool"),
        }

    def call_with_cache(self, token_ids, cache, cache_index, start_index=None, training=False):
        """Run ``token_ids`` ``(B, Tq)`` sitting at ``[cache_index, cache_index + Tq)``.

        Args:
            token_ids: int ``(B, Tq)``: a prompt (``Tq > 1``) or one new token.
            cache: from :meth:`init_cache` or the previous call.
            cache_index: scalar int (Python or tensor): where ``token_ids`` go.
            start_index: position of ``token_ids[:, 0]`` for the position
                embedding, scalar or ``(B,)`` (left padding: ``cache_index -
                number_of_left_pads``). Defaults to ``cache_index``. Learned
                and sinusoidal positions only: rotary attention sees relative
                positions, which left padding does not change.

        Returns:
            ``(logits (B, Tq, V), new_cache)``. The same logits as
            ``model(all_ids)[:, cache_index:cache_index + Tq]``.
        """
        start = cache_index if start_index is None else start_index
        x = call_layer(self.embedding, token_ids, start_index=start)  # (B, Tq, C)
        padding = _write_padding(cache["padding"], token_ids, cache_index, self.pad_id)  # (B, L)
        layer_caches = []
        for block, layer_cache in zip(self.blocks, cache["self_attention"]):
            x, layer_cache = call_layer(block, x, padding_mask=padding,
                                        self_attention_cache=layer_cache,
                                        cache_index=cache_index, training=training)
            layer_caches.append(layer_cache)
        logits = self._logits(call_layer(self.final_norm, x), self.embedding)  # (B, Tq, V)
        return logits, {"self_attention": layer_caches, "padding": padding}

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size, "max_length": self.max_length, "dim": self.dim,
            "num_heads": self.num_heads, "ff_dim": self.ff_dim, "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads, "position": self.position,
            "tie_embeddings": self.tie_embeddings, "dropout": self.dropout,
            "pad_id": self.pad_id, "activation": self.activation,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Seq2SeqTransformer(_LogitsMixin, keras.Model):
    """The encoder-decoder Transformer (Vaswani et al., 2017).

    ``encoder_embedding → encoder blocks → memory``;
    ``decoder_embedding → decoder blocks (causal self-attention, attention to
    the memory) → logits``.

    Args:
        source_vocab_size, target_vocab_size: vocabularies.
        max_length: longest source and longest target.
        dim, num_heads, ff_dim: as :class:`DecoderOnlyLM`.
        num_encoder_layers, num_decoder_layers: block counts.
        dropout: everywhere.
        num_kv_heads: GQA in the decoder.
        position: ``"learned"`` or ``"sinusoidal"``.
        interaction: how decoder blocks meet the memory: ``"sequential"``,
            ``"parallel"`` or ``"joint"`` (:mod:`keras_decoder.layers`).
        norm_first: pre-norm (with final norms) or post-norm blocks.
        tie_embeddings: logits from the decoder's token table.
        pad_id: padding id of both vocabularies.
        activation, layer_norm_epsilon: of the blocks.

    Call arguments:
        inputs: a dict ``{"encoder_input_ids": (B, S), "decoder_input_ids":
            (B, T)}``, int.

    Returns:
        float32 logits ``(B, T, target_vocab_size)``.

    Sublayers: ``encoder_embedding``, ``decoder_embedding``,
    ``encoder_block_{i}``, ``decoder_block_{i}``, ``encoder_norm`` and
    ``decoder_norm`` (pre-norm only), ``lm_head`` (untied only).
    """

    INPUT_KEYS = ("encoder_input_ids", "decoder_input_ids")

    def __init__(self, source_vocab_size, target_vocab_size, max_length, dim, num_heads, ff_dim,
                 num_encoder_layers, num_decoder_layers, dropout=0.0, num_kv_heads=None,
                 position="learned", interaction="sequential", norm_first=True,
                 tie_embeddings=True, pad_id=0, activation="gelu", layer_norm_epsilon=1e-5,
                 **kwargs):
        super().__init__(**kwargs)
        if position not in _SEQ2SEQ_POSITIONS:
            raise ValueError(
                f"Expected position in {_SEQ2SEQ_POSITIONS}. Received: position={position!r}")
        self.source_vocab_size = int(source_vocab_size)
        self.target_vocab_size = int(target_vocab_size)
        self.max_length, self.dim = int(max_length), int(dim)
        self.num_heads, self.ff_dim = int(num_heads), int(ff_dim)
        self.num_encoder_layers = int(num_encoder_layers)
        self.num_decoder_layers = int(num_decoder_layers)
        self.dropout, self.num_kv_heads, self.position = float(dropout), num_kv_heads, position
        self.interaction, self.norm_first = interaction, bool(norm_first)
        self.tie_embeddings, self.pad_id = bool(tie_embeddings), int(pad_id)
        self.activation, self.layer_norm_epsilon = activation, float(layer_norm_epsilon)
        policy = dict(dtype=self.dtype_policy)
        block = dict(dropout=self.dropout, norm_first=self.norm_first, activation=activation,
                     layer_norm_epsilon=self.layer_norm_epsilon, **policy)

        def embedding(vocab, name):
            return TokenAndPositionEmbedding(vocab, self.max_length, self.dim, position=position,
                                             pad_id=self.pad_id, name=name, **policy)

        self.encoder_embedding = embedding(self.source_vocab_size, "encoder_embedding")
        self.decoder_embedding = embedding(self.target_vocab_size, "decoder_embedding")
        self.encoder_dropout = keras.layers.Dropout(self.dropout, name="encoder_dropout", **policy)
        self.decoder_dropout = keras.layers.Dropout(self.dropout, name="decoder_dropout", **policy)
        self.encoder_blocks = [
            TransformerEncoderBlock(self.dim, self.num_heads, self.ff_dim,
                                    name=f"encoder_block_{i}", **block)
            for i in range(self.num_encoder_layers)
        ]
        self.decoder_blocks = [
            TransformerDecoderBlock(self.dim, self.num_heads, self.ff_dim, cross_attention=True,
                                    interaction=interaction, num_kv_heads=num_kv_heads,
                                    name=f"decoder_block_{i}", **block)
            for i in range(self.num_decoder_layers)
        ]
        self.encoder_norm = self.decoder_norm = None
        if self.norm_first:  # pre-norm stacks end un-normalised: add a final norm
            norm = dict(epsilon=self.layer_norm_epsilon, **policy)
            self.encoder_norm = keras.layers.LayerNormalization(name="encoder_norm", **norm)
            self.decoder_norm = keras.layers.LayerNormalization(name="decoder_norm", **norm)
        self.lm_head = None
        if not self.tie_embeddings:
            self.lm_head = keras.layers.Dense(self.target_vocab_size, name="lm_head", **policy)

    def _check_inputs(self, inputs):
        if not isinstance(inputs, dict) or any(k not in inputs for k in self.INPUT_KEYS):
            got = list(inputs) if isinstance(inputs, dict) else type(inputs).__name__
            raise ValueError(f"Expected a dict with keys {self.INPUT_KEYS}. Received: {got}")
        return inputs["encoder_input_ids"], inputs["decoder_input_ids"]

    def build(self, inputs_shape):
        source, target = self._check_inputs(inputs_shape)
        source_hidden, target_hidden = tuple(source) + (self.dim,), tuple(target) + (self.dim,)
        self.encoder_embedding.build(tuple(source))
        self.decoder_embedding.build(tuple(target))
        for block in self.encoder_blocks:
            block.build(source_hidden)
        for block in self.decoder_blocks:
            block.build(target_hidden, source_hidden)
        for norm, shape in ((self.encoder_norm, source_hidden), (self.decoder_norm, target_hidden)):
            if norm is not None:
                norm.build(shape)
        if self.lm_head is not None:
            self.lm_head.build(target_hidden)
        self.built = True

    # ------------------------------------------------------------- the parts
    def encode(self, encoder_input_ids, training=None):
        """Source ids ``(B, S)`` → ``(memory (B, S, C), memory_mask bool (B, S))``."""
        memory_mask = ops.not_equal(encoder_input_ids, self.pad_id)  # (B, S)
        x = self.encoder_embedding(encoder_input_ids)  # (B, S, C)
        x = self.encoder_dropout(x, training=training)
        for block in self.encoder_blocks:
            x = block(x, padding_mask=memory_mask, training=training)
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        return x, memory_mask

    def decode(self, decoder_input_ids, memory, memory_mask, start_index=0, training=None):
        """Target ids ``(B, T)`` and the memory → logits ``(B, T, V)``."""
        padding = ops.not_equal(decoder_input_ids, self.pad_id)  # (B, T)
        x = self.decoder_embedding(decoder_input_ids, start_index=start_index)  # (B, T, C)
        x = self.decoder_dropout(x, training=training)
        for block in self.decoder_blocks:
            x = block(x, memory, padding_mask=padding, memory_mask=memory_mask, training=training)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return self._logits(x, self.decoder_embedding)

    def call(self, inputs, training=None):
        source, target = self._check_inputs(inputs)
        memory, memory_mask = self.encode(source, training=training)
        return self.decode(target, memory, memory_mask, training=training)

    def compute_mask(self, *args, **kwargs):
        return None

    # ------------------------------------------------------------- the cache
    def init_cache(self, batch_size, max_length=None, encoder_input_ids=None, dtype=None):
        """Encode the source once and project it for every decoder block.

        Args:
            batch_size: ``B`` (must match ``encoder_input_ids``).
            max_length: decoder cache length ``L`` (default: the model's).
            encoder_input_ids: int ``(B, S)``, required.

        Returns:
            A cache dict (module docstring) with the projected memory.
        """
        if encoder_input_ids is None:
            raise ValueError("Expected `encoder_input_ids` (B, S): a Seq2SeqTransformer cache "
                             "holds the encoded source. Received: encoder_input_ids=None")
        if encoder_input_ids.shape[0] is not None and encoder_input_ids.shape[0] != batch_size:
            raise ValueError(
                f"Expected encoder_input_ids with batch_size={batch_size} rows. "
                f"Received: encoder_input_ids.shape={tuple(encoder_input_ids.shape)}")
        max_length = self.max_length if max_length is None else int(max_length)
        memory, memory_mask = self.encode(encoder_input_ids, training=False)
        return {
            "self_attention": [block.init_cache(batch_size, max_length, dtype)
                               for block in self.decoder_blocks],
            "cross_attention": [block.memory_cache(memory) for block in self.decoder_blocks],
            "memory_mask": memory_mask,
            "padding": ops.zeros((batch_size, max_length), dtype="bool"),
        }

    def call_with_cache(self, token_ids, cache, cache_index, start_index=None, training=False):
        """Decode ``token_ids`` ``(B, Tq)`` at ``cache_index``; see
        :meth:`DecoderOnlyLM.call_with_cache`. The memory is read from the
        cache, never recomputed. Returns ``(logits (B, Tq, V), new_cache)``."""
        start = cache_index if start_index is None else start_index
        x = call_layer(self.decoder_embedding, token_ids, start_index=start)  # (B, Tq, C)
        padding = _write_padding(cache["padding"], token_ids, cache_index, self.pad_id)
        layer_caches = []
        for block, self_cache, memory_cache in zip(self.decoder_blocks, cache["self_attention"],
                                                   cache["cross_attention"]):
            x, self_cache = call_layer(block, x, padding_mask=padding,
                                       memory_mask=cache["memory_mask"],
                                       self_attention_cache=self_cache,
                                       cross_attention_cache=memory_cache,
                                       cache_index=cache_index, training=training)
            layer_caches.append(self_cache)
        if self.decoder_norm is not None:
            x = call_layer(self.decoder_norm, x)
        logits = self._logits(x, self.decoder_embedding)
        return logits, {**cache, "self_attention": layer_caches, "padding": padding}

    def get_config(self):
        return {
            **super().get_config(),
            "source_vocab_size": self.source_vocab_size,
            "target_vocab_size": self.target_vocab_size,
            "max_length": self.max_length, "dim": self.dim, "num_heads": self.num_heads,
            "ff_dim": self.ff_dim, "num_encoder_layers": self.num_encoder_layers,
            "num_decoder_layers": self.num_decoder_layers, "dropout": self.dropout,
            "num_kv_heads": self.num_kv_heads, "position": self.position,
            "interaction": self.interaction, "norm_first": self.norm_first,
            "tie_embeddings": self.tie_embeddings, "pad_id": self.pad_id,
            "activation": self.activation, "layer_norm_epsilon": self.layer_norm_epsilon,
        }
