"""What goes into a decoder: shifted targets, token and position embeddings, prefixes.

A decoder is trained with *teacher forcing*: it reads the target sequence
shifted one step to the right (``[START] y0 y1 ...``) and predicts the target
itself (``y0 y1 y2 ...``). At inference it reads its own previous outputs one
token at a time. This module builds those inputs, and the embeddings that turn
token ids and positions into vectors.

Shapes: ``B`` batch, ``T`` sequence length, ``D`` embedding size, ``H`` heads.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_decoder._calls import call_layer
from keras_decoder import masks as _masks

__all__ = [
    "shift_right",
    "teacher_forcing",
    "TokenAndPositionEmbedding",
    "SinusoidalPositionEncoding",
    "RotaryEmbedding",
    "PrefixConditioning",
]

_register = keras.saving.register_keras_serializable(package="keras_decoder")


# ---------------------------------------------------------------------------
# Decoder inputs for teacher forcing.
# ---------------------------------------------------------------------------
def _int_ids(token_ids, name="token_ids"):
    token_ids = _masks._tensor(token_ids, name)
    _masks._check_rank(token_ids, 2, name, "(batch, seq_len)")
    _masks._check_int_ids(token_ids, name)
    return token_ids


def shift_right(token_ids, start_id, pad_id=0):
    """Targets without BOS -> decoder inputs: ``[start, t0, ..., t_{T-2}]``.

    The decoder input at step ``i`` is the target of step ``i - 1``; step 0
    reads ``start_id``. The last target is dropped: no step reads it. Padding
    moves right with the targets. A row that is entirely padding (a batch
    filler) stays entirely padding: it does not become a one-token example.

    Args:
        token_ids: int ``(B, T)`` target ids (no BOS).
        start_id: the BOS / ``[START]`` id.
        pad_id: the padding id (default 0).

    Returns:
        ``(B, T)``, same dtype as ``token_ids``.
    """
    token_ids = _int_ids(token_ids)
    batch = ops.shape(token_ids)[0]
    start = ops.full((batch, 1), start_id, dtype=token_ids.dtype)
    shifted = ops.concatenate([start, token_ids[:, :-1]], axis=1)
    empty_row = ops.all(ops.equal(token_ids, pad_id), axis=1, keepdims=True)  # (B, 1)
    return ops.where(empty_row, ops.cast(pad_id, token_ids.dtype), shifted)


def teacher_forcing(sequences, pad_id=0):
    """Split ``[BOS] y0 ... y_n [EOS] [PAD]...`` into decoder inputs and labels.

    Args:
        sequences: int ``(B, T)``, each row starting with BOS and ending with
            EOS, then padding.
        pad_id: the padding id (default 0).

    Returns:
        A dict with ``decoder_input_ids = sequences[:, :-1]`` ``(B, T-1)``,
        ``labels = sequences[:, 1:]`` ``(B, T-1)`` and
        ``sample_weight = float32(labels != pad_id)`` ``(B, T-1)``: a padded
        label counts for nothing in the loss.
    """
    sequences = _int_ids(sequences, "sequences")
    length = sequences.shape[1]
    if length is not None and length < 2:
        raise ValueError(
            "Expected sequences of length >= 2 (at least BOS and EOS). "
            f"Received: sequences.shape={tuple(sequences.shape)}"
        )
    labels = sequences[:, 1:]
    return {
        "decoder_input_ids": sequences[:, :-1],
        "labels": labels,
        "sample_weight": ops.cast(ops.not_equal(labels, pad_id), "float32"),
    }


# ---------------------------------------------------------------------------
# Positions.
# ---------------------------------------------------------------------------
def _positions(length, start_index):
    """Absolute positions ``(1, T)`` or ``(B, T)`` for a scalar or per-row start."""
    start = ops.convert_to_tensor(start_index)
    start = ops.cast(start, "int32")
    steps = ops.arange(length, dtype="int32")
    if len(start.shape) == 0:
        return ops.expand_dims(steps + start, 0)  # (1, T)
    if len(start.shape) != 1:
        raise ValueError(
            "Expected `start_index` to be a scalar or of shape (batch,). "
            f"Received: start_index.shape={tuple(start.shape)}"
        )
    return ops.expand_dims(start, 1) + ops.expand_dims(steps, 0)  # (B, T)


def _sinusoid(positions, dim, max_wavelength, dtype):
    """Vaswani et al.: ``PE[p, 2i] = sin(p / w^(2i/D))``, ``PE[p, 2i+1] = cos(...)``.

    ``positions`` is int ``(..., T)``; returns ``(..., T, D)``.
    """
    half = (dim + 1) // 2
    exponent = ops.arange(half, dtype="float32") * (2.0 / dim)
    inv_freq = ops.power(ops.cast(max_wavelength, "float32"), -exponent)  # (D/2,)
    angles = ops.expand_dims(ops.cast(positions, "float32"), -1) * inv_freq  # (..., T, D/2)
    # Interleave sin and cos: [sin0, cos0, sin1, cos1, ...].
    pe = ops.stack([ops.sin(angles), ops.cos(angles)], axis=-1)  # (..., T, D/2, 2)
    pe = ops.reshape(pe, tuple(ops.shape(angles)[:-1]) + (2 * half,))
    return ops.cast(pe[..., :dim], dtype)


def _check_start(start_index, length, max_length):
    """Eagerly check that positions stay below ``max_length``."""
    if max_length is None or length is None:
        return
    values = _masks._concrete(ops.convert_to_tensor(start_index))
    if values is None:
        return
    if np.size(values) and int(np.max(values)) + length > max_length:
        raise ValueError(
            f"Expected start_index + seq_len <= max_length={max_length}. "
            f"Received: start_index={np.asarray(values).tolist()}, seq_len={length}"
        )


@_register
class SinusoidalPositionEncoding(keras.layers.Layer):
    """Fixed sinusoidal position encoding (Vaswani et al., 2017).

    ``PE[p, 2i] = sin(p / max_wavelength^(2i/D))`` and
    ``PE[p, 2i+1] = cos(p / max_wavelength^(2i/D))``.

    Call arguments:
        inputs: ``(B, T, D)`` embeddings; only their shape and dtype are used.
        start_index: int scalar, or ``(B,)`` per row: the absolute position of
            the first token (cached decoding, left padding).

    Returns:
        ``(B, T, D)`` encodings, to be *added* to the embeddings.
    """

    def __init__(self, max_wavelength=10000, **kwargs):
        super().__init__(**kwargs)
        self.max_wavelength = max_wavelength
        self.supports_masking = True

    def call(self, inputs, start_index=0):
        shape = ops.shape(inputs)
        positions = _positions(shape[1], start_index)
        pe = _sinusoid(positions, inputs.shape[-1], self.max_wavelength, self.compute_dtype)
        return ops.broadcast_to(pe, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "max_wavelength": self.max_wavelength}


@_register
class RotaryEmbedding(keras.layers.Layer):
    """Rotary position embedding (RoPE, Su et al., 2021) for queries and keys.

    Each pair of channels ``(x[i], x[i + D/2])`` is rotated by the angle
    ``p * max_wavelength^(-2i/D)``, where ``p`` is the token's absolute position.
    Rotations compose, so ``<rot(q, p), rot(k, s)>`` depends only on ``p - s``:
    attention sees *relative* positions, and a cached decoder can rotate a new
    token at any ``start_index``.

    Call arguments:
        inputs: ``(B, T, H, D)`` queries or keys, ``D`` even.
        start_index: int scalar, or ``(B,)`` per row.

    Returns:
        ``(B, T, H, D)``, the same dtype as ``inputs``.
    """

    def __init__(self, max_wavelength=10000, **kwargs):
        super().__init__(**kwargs)
        self.max_wavelength = max_wavelength
        self.supports_masking = True  # the padding mask passes through unchanged

    def call(self, inputs, start_index=0):
        dim = inputs.shape[-1]
        if len(inputs.shape) != 4 or dim is None or dim % 2:
            raise ValueError(
                "Expected inputs of shape (batch, seq_len, num_heads, head_dim) "
                f"with an even head_dim. Received: inputs.shape={tuple(inputs.shape)}"
            )
        positions = _positions(ops.shape(inputs)[1], start_index)  # (1|B, T)
        exponent = ops.arange(dim // 2, dtype="float32") * (2.0 / dim)
        inv_freq = ops.power(ops.cast(self.max_wavelength, "float32"), -exponent)
        angles = ops.expand_dims(ops.cast(positions, "float32"), -1) * inv_freq  # (1|B, T, D/2)
        angles = ops.expand_dims(ops.concatenate([angles, angles], axis=-1), 2)  # (1|B, T, 1, D)
        x = ops.cast(inputs, "float32")
        x1, x2 = ops.split(x, 2, axis=-1)
        rotated_half = ops.concatenate([-x2, x1], axis=-1)
        out = x * ops.cos(angles) + rotated_half * ops.sin(angles)
        return ops.cast(out, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "max_wavelength": self.max_wavelength}


# ---------------------------------------------------------------------------
# Token + position embedding.
# ---------------------------------------------------------------------------
_POSITIONS = ("learned", "sinusoidal", "none")


@_register
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding plus a position signal, carrying the Keras padding mask.

    Args:
        vocab_size: number of token ids.
        max_length: the longest sequence (positions ``0 .. max_length - 1``).
        embed_dim: ``D``.
        position: ``"learned"`` (a trained table), ``"sinusoidal"`` (fixed,
            Vaswani et al.) or ``"none"`` (for rotary attention, which puts
            positions into the attention itself).
        scale: multiply token embeddings by ``sqrt(D)`` (Vaswani et al.), which
            keeps them on the scale of a sinusoidal encoding.
        pad_id: the padding id; the output's Keras mask is
            ``token_ids != pad_id``.

    Call arguments:
        token_ids: int ``(B, T)``. Ids outside ``[0, vocab_size)`` raise a
            ``ValueError`` when they can be checked (eagerly).
        start_index: int scalar or ``(B,)``: position of the first token, for
            cached decoding (``cache_index``) and left-padded prompts. Positions
            below 0 (left padding) are clipped to 0.

    Returns:
        ``(B, T, D)`` with the Keras mask ``padding_mask(token_ids, pad_id)``.
    """

    def __init__(self, vocab_size, max_length, embed_dim, position="learned", scale=False,
                 pad_id=0, **kwargs):
        super().__init__(**kwargs)
        if position not in _POSITIONS:
            raise ValueError(f"Expected position in {_POSITIONS}. Received: position={position!r}")
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.embed_dim = embed_dim
        self.position = position
        self.scale = scale
        self.pad_id = pad_id
        self.supports_masking = True
        self.token_embedding = keras.layers.Embedding(
            vocab_size, embed_dim, dtype=self.dtype_policy, name="token_embedding"
        )
        self.position_embedding = None
        if position == "learned":
            self.position_embedding = keras.layers.Embedding(
                max_length, embed_dim, dtype=self.dtype_policy, name="position_embedding"
            )
        elif position == "sinusoidal":
            self.position_embedding = SinusoidalPositionEncoding(
                dtype=self.dtype_policy, name="position_embedding"
            )

    def build(self, input_shape):
        self.token_embedding.build(input_shape)
        if self.position == "learned":
            self.position_embedding.build((None,))
        self.built = True

    def _check_ids(self, token_ids):
        values = _masks._concrete(token_ids)
        if values is None or not values.size:
            return
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(
                f"Expected token ids in [0, vocab_size={self.vocab_size}). "
                f"Received: ids from {low} to {high}"
            )

    def call(self, token_ids, start_index=0):
        token_ids = _int_ids(token_ids)
        self._check_ids(token_ids)
        length = token_ids.shape[1]
        _check_start(start_index, length, self.max_length)
        x = call_layer(self.token_embedding, token_ids)  # (B, T, D)
        if self.scale:
            x = x * ops.cast(math.sqrt(self.embed_dim), x.dtype)
        if self.position == "learned":
            positions = _positions(ops.shape(token_ids)[1], start_index)
            positions = ops.clip(positions, 0, self.max_length - 1)
            x = x + call_layer(self.position_embedding, positions)  # (1|B, T, D) broadcasts
        elif self.position == "sinusoidal":
            x = x + call_layer(self.position_embedding, x, start_index=start_index)
        return x

    def compute_mask(self, token_ids, mask=None):
        return _masks.padding_mask(token_ids, self.pad_id)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.embed_dim,)

    @property
    def embeddings(self):
        """The token table ``(vocab_size, D)``, e.g. for tied output logits."""
        return self.token_embedding.embeddings

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "embed_dim": self.embed_dim,
            "position": self.position,
            "scale": self.scale,
            "pad_id": self.pad_id,
        }


# ---------------------------------------------------------------------------
# Conditioning prefixes.
# ---------------------------------------------------------------------------
@_register
class PrefixConditioning(keras.layers.Layer):
    """A context vector as decoder input: learned prefix embeddings.

    The article's "hidden state of a pretrained model as decoder input", done
    properly: a context vector ``(B, C)`` (an encoder's ``[CLS]`` state, an
    image feature, a style vector) is mapped by one dense layer to ``P`` prefix
    embeddings ``(B, P, D)`` that are prepended to the token embeddings. The
    decoder then attends to them like to any other token; combine with
    :func:`keras_decoder.masks.prefix_lm_mask` so that the prefix is seen by
    every position. (This is prefix conditioning as in ClipCap-style models;
    it is *not* "the previous decoder's output".)

    Call arguments:
        token_embeddings: ``(B, T, D)``, optionally carrying a Keras mask.
        context: ``(B, C)``.

    Returns:
        ``(B, P + T, D)``. Its Keras mask is ``True`` for the ``P`` prefix
        positions followed by the token embeddings' mask (all ``True`` if none).
    """

    def __init__(self, num_prefix_tokens, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.num_prefix_tokens = num_prefix_tokens
        self.embed_dim = embed_dim
        self.supports_masking = True
        self.projection = keras.layers.Dense(
            num_prefix_tokens * embed_dim, dtype=self.dtype_policy, name="prefix_projection"
        )

    def build(self, token_embeddings_shape, context_shape=None):
        if context_shape is not None:
            self.projection.build(context_shape)
        self.built = True

    def call(self, token_embeddings, context):
        if len(context.shape) != 2:
            raise ValueError(
                "Expected `context` of shape (batch, context_dim). "
                f"Received: context.shape={tuple(context.shape)}"
            )
        if len(token_embeddings.shape) != 3 or token_embeddings.shape[-1] != self.embed_dim:
            raise ValueError(
                f"Expected `token_embeddings` of shape (batch, seq_len, {self.embed_dim}). "
                f"Received: token_embeddings.shape={tuple(token_embeddings.shape)}"
            )
        prefix = self.projection(context)  # (B, P * D)
        prefix = ops.reshape(prefix, (-1, self.num_prefix_tokens, self.embed_dim))
        prefix = ops.cast(prefix, token_embeddings.dtype)
        return ops.concatenate([prefix, token_embeddings], axis=1)

    def compute_mask(self, token_embeddings, previous_mask=None):
        # Built with ones_like, so that an unknown (symbolic) batch size works.
        if previous_mask is None:
            previous_mask = ops.ones_like(token_embeddings[..., 0], dtype="bool")
        one = ops.ones_like(token_embeddings[:, :1, 0], dtype="bool")  # (B, 1)
        prefix = ops.repeat(one, self.num_prefix_tokens, axis=1)  # (B, P)
        return ops.concatenate([prefix, ops.cast(previous_mask, "bool")], axis=1)

    def compute_output_shape(self, token_embeddings_shape, context_shape=None):
        length = token_embeddings_shape[1]
        length = None if length is None else length + self.num_prefix_tokens
        return (token_embeddings_shape[0], length, self.embed_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "num_prefix_tokens": self.num_prefix_tokens,
            "embed_dim": self.embed_dim,
        }
