"""Sharding our models with ``keras.distribution`` (we write no distribution code).

Keras 3 spreads a model over several devices with a
:class:`keras.distribution.Distribution`:

* ``DataParallel``: every device holds all the weights and a slice of the
  batch; gradients are averaged.
* ``ModelParallel``: a ``LayoutMap`` says, for each weight path, which
  dimension is cut across which axis of a ``DeviceMesh``. XLA (GSPMD) inserts
  the communication.

:func:`layout_map` gives the layouts for :class:`~keras_decoder.DecoderOnlyLM`
and :class:`~keras_decoder.Seq2SeqTransformer`, Megatron-style, on the mesh
axis ``model``:

=============================================  ====================  ===============
weight (path ends with)                        shape                 layout
=============================================  ====================  ===============
``token_embedding/embeddings``                 ``(V, C)``            ``(None, model)``
``position_embedding/embeddings``              ``(max_length, C)``   ``(None, model)``
``query|key|value/kernel``                     ``(C, H, D)``         ``(None, model, None)``  heads
``query|key|value/bias``                       ``(H, D)``            ``(model, None)``
``attention_output/kernel``                    ``(H, D, C)``         ``(model, None, None)``  heads
``feed_forward/hidden/kernel``                 ``(C, F)``            ``(None, model)``  hidden size
``feed_forward/hidden/bias``                   ``(F,)``              ``(model,)``
``feed_forward/output/kernel``                 ``(F, C)``            ``(model, None)``
``lm_head/kernel`` (untied only)               ``(C, V)``            ``(model, None)``
=============================================  ====================  ===============

Everything else (layer norms, output biases) is replicated. Attention is cut
by heads and the feed-forward block by its hidden size, so each device
computes whole heads and a slice of the hidden units, and one all-reduce per
sub-block joins them. Embeddings are cut along ``C``, not the vocabulary, so
that any vocabulary size works.

The sizes that are cut must be divisible by the size of the ``model`` axis:
``num_heads``, ``num_kv_heads`` (pass ``shard_kv_heads=False`` for
multi-query attention), ``ff_dim`` and ``dim``.

Weight paths are stable: every weight-holding sublayer has a fixed name
(``decoder_block_0/self_attention/query/kernel``); only the model's own name
(``decoder_only_lm``, ``decoder_only_lm_1``, ...) varies, and the patterns
skip it.

``keras.distribution`` works on the JAX backend only. On TensorFlow and
PyTorch :func:`layout_map` still builds the map (it is plain data), but a
distribution cannot be used.

Example (JAX, 8 devices as 2 data-parallel replicas × 4 model shards)::

    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"))
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=layout_map("decoder_only_lm", mesh), batch_dim_name="batch"))
    model = DecoderOnlyLM(...)   # weights are created sharded
"""

import keras

__all__ = ["MODEL_KINDS", "layout_map", "layout_rules"]

MODEL_KINDS = ("decoder_only_lm", "seq2seq_transformer")
_ALIASES = {
    "decoder_only_lm": "decoder_only_lm", "DecoderOnlyLM": "decoder_only_lm",
    "lm": "decoder_only_lm",
    "seq2seq_transformer": "seq2seq_transformer", "Seq2SeqTransformer": "seq2seq_transformer",
    "seq2seq": "seq2seq_transformer",
}

# One regular expression per weight, matched against the whole `variable.path`
# (``re.fullmatch``). `M` stands for the model axis.
_COMMON_RULES = (
    (r".*token_embedding/embeddings", (None, "M")),
    (r".*position_embedding/embeddings", (None, "M")),
    (r".*attention/query/kernel", (None, "M", None)),
    (r".*attention/query/bias", ("M", None)),
    (r".*attention/attention_output/kernel", ("M", None, None)),
    (r".*feed_forward/hidden/kernel", (None, "M")),
    (r".*feed_forward/hidden/bias", ("M",)),
    (r".*feed_forward/output/kernel", ("M", None)),
    (r".*lm_head/kernel", ("M", None)),
)
_KV_RULES = (
    (r".*attention/(key|value)/kernel", (None, "M", None)),
    (r".*attention/(key|value)/bias", ("M", None)),
)


def _kind(model_kind):
    if isinstance(model_kind, type):
        model_kind = model_kind.__name__
    elif not isinstance(model_kind, str):
        model_kind = type(model_kind).__name__  # a model instance
    if model_kind not in _ALIASES:
        raise ValueError(
            f"Expected model_kind in {MODEL_KINDS} (or the class, or a model). "
            f"Received: model_kind={model_kind!r}"
        )
    return _ALIASES[model_kind]


def layout_rules(model_kind, model_axis="model", shard_kv_heads=True):
    """The layout table as a dict ``{path regex: axes tuple}`` (no mesh needed).

    Args:
        model_kind: ``"decoder_only_lm"`` or ``"seq2seq_transformer"`` (or
            the class, or a model instance).
        model_axis: the mesh axis that weights are cut across.
        shard_kv_heads: cut key/value projections by heads too (needs
            ``num_kv_heads`` divisible by the axis size; ``False`` for MQA).

    Returns:
        A dict from regular expression to a tuple of axis names or ``None``.
    """
    _kind(model_kind)  # both kinds share the sublayer names; validate only
    rules = _COMMON_RULES + (_KV_RULES if shard_kv_heads else ())
    return {pattern: tuple(model_axis if a == "M" else a for a in axes)
            for pattern, axes in rules}


def _divides_kv_heads(model, size):
    heads = getattr(model, "num_kv_heads", None) or getattr(model, "num_heads", None)
    return heads is None or int(heads) % int(size) == 0


def layout_map(model_kind, mesh, model_axis=None, shard_kv_heads=None):
    """A ``keras.distribution.LayoutMap`` for model parallelism on ``mesh``.

    Args:
        model_kind: ``"decoder_only_lm"`` or ``"seq2seq_transformer"`` (or
            the class, or a model instance).
        mesh: a ``keras.distribution.DeviceMesh``, e.g. shape ``(2, 4)`` with
            ``axis_names=("batch", "model")``.
        model_axis: the mesh axis for weights; default ``"model"`` if the mesh
            has it, else its last axis.
        shard_kv_heads: see :func:`layout_rules`. ``None`` (default): yes,
            unless ``model_kind`` is a model whose ``num_kv_heads`` the model
            axis does not divide (GQA/MQA with few key/value heads).

    Returns:
        A ``LayoutMap``; pass it to ``keras.distribution.ModelParallel(
        layout_map=..., batch_dim_name=...)``. Weights that no rule matches
        are replicated.
    """
    if not isinstance(mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            f"Expected a keras.distribution.DeviceMesh. Received: mesh={type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if model_axis is None:
        model_axis = "model" if "model" in names else names[-1]
    if model_axis not in names:
        raise ValueError(
            f"Expected model_axis to be one of the mesh axes {names}. "
            f"Received: model_axis={model_axis!r}")
    if shard_kv_heads is None:
        size = mesh.shape[names.index(model_axis)]
        shard_kv_heads = isinstance(model_kind, (str, type)) or _divides_kv_heads(model_kind, size)
    result = keras.distribution.LayoutMap(mesh)
    for pattern, axes in layout_rules(model_kind, model_axis, shard_kv_heads).items():
        result[pattern] = axes
    return result
