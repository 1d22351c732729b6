"""Fine-tuning helpers: prompt loss masks, LoRA (Keras's own), freezing.

Fine-tuning on instructions trains the model on ``prompt + response`` rows but
asks it to predict only the response: the prompt is given, not learned. That is
a *loss* mask, not an attention mask: the response still attends to the prompt.

LoRA here is Keras's ``Layer.enable_lora`` (``Dense`` and ``EinsumDense``):
this module only chooses which layers get it and freezes everything else.
"""

import keras
import numpy as np
from keras import ops

from keras_decoder import masks as _masks

__all__ = ["prompt_loss_mask", "enable_lora", "freeze", "trainable_fraction"]


def prompt_loss_mask(prompt_lengths, total_len):
    """Loss weights that count only response tokens.

    Position ``t`` of row ``b`` gets ``1.0`` iff ``t >= prompt_lengths[b]``:
    the tokens after the prompt. The mask is in *token* positions; for labels
    ``tokens[:, 1:]`` use ``mask[:, 1:]``. Multiply by the padding weights to
    drop padding too.

    Args:
        prompt_lengths: int ``(B,)``, each in ``[0, total_len]``.
        total_len: int ``T``.

    Returns:
        float32 ``(B, T)``.
    """
    total_len = _masks._check_length(total_len, "total_len")
    lengths = _masks._tensor(prompt_lengths, "prompt_lengths")
    _masks._check_rank(lengths, 1, "prompt_lengths", "(batch,)")
    _masks._check_int_ids(lengths, "prompt_lengths")
    values = _masks._concrete(lengths)
    if values is not None and values.size and (values.min() < 0 or values.max() > total_len):
        raise ValueError(
            f"Expected every prompt length in [0, total_len={total_len}]. "
            f"Received: prompt_lengths={values.tolist()}"
        )
    positions = ops.expand_dims(ops.arange(total_len, dtype="int32"), 0)  # (1, T)
    response = ops.greater_equal(positions, ops.expand_dims(ops.cast(lengths, "int32"), 1))
    return ops.cast(response, "float32")


def _layers(model):
    return [layer for layer in model._flatten_layers(include_self=False)]


def _path(variable):
    return getattr(variable, "path", variable.name)


def freeze(model, except_=()):
    """Make every weight non-trainable except those whose path matches ``except_``.

    Args:
        model: a built Keras model.
        except_: a substring, a list of substrings of weight paths (e.g.
            ``("lora",)`` or ``("final_norm",)``), or a callable
            ``f(variable) -> bool``.

    Returns:
        The model (changed in place).
    """
    if isinstance(except_, str):
        except_ = (except_,)
    keep = except_ if callable(except_) else (lambda v: any(s in _path(v) for s in except_))
    for variable in model.weights:
        variable.trainable = bool(keep(variable))
    return model


def enable_lora(model, rank, targets=("query", "value")):
    """Turn on LoRA (Keras ``Layer.enable_lora``) in the layers named ``targets``.

    Every other weight is frozen, and so are the targets' own kernels and
    biases: only the low-rank ``lora_kernel_a`` / ``lora_kernel_b`` train.

    Args:
        model: a built model (e.g. :class:`keras_decoder.DecoderOnlyLM`, whose
            attention projections are named ``query``, ``key``, ``value`` and
            ``attention_output``).
        rank: the LoRA rank.
        targets: layer names to adapt.

    Returns:
        The list of layers that got LoRA.
    """
    if not model.built:
        raise ValueError("Expected a built model (call it once on data first). Received: an unbuilt model")
    if int(rank) < 1:
        raise ValueError(f"Expected rank >= 1. Received: rank={rank}")
    chosen = [layer for layer in _layers(model)
              if layer.name in tuple(targets) and hasattr(layer, "enable_lora")]
    if not chosen:
        names = sorted({layer.name for layer in _layers(model) if hasattr(layer, "enable_lora")})
        raise ValueError(f"Expected layers named {tuple(targets)}. Received: a model whose "
                         f"LoRA-capable layers are named {names}")
    freeze(model)
    for layer in chosen:
        layer.enable_lora(int(rank))
    return chosen


def _count(variables):
    return int(sum(np.prod(v.shape) for v in variables))


def trainable_fraction(model):
    """Trainable parameters divided by all parameters (a float in ``[0, 1]``)."""
    total = _count(model.weights)
    return _count(model.trainable_weights) / total if total else 0.0
