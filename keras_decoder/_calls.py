"""How our layers call their sublayers, and the eager decoding loop's fast path.

Keras's ``Layer.__call__`` does real work at every call: it converts and casts
the inputs, binds the call signature, fills in and propagates Keras masks, and
opens name and autocast scopes. Under ``jit_compile`` or ``jax.jit`` that work
runs once, while tracing. On torch, which decodes eagerly, it runs at every
generated token: about 50 µs per sublayer, and a 4-block ``DecoderOnlyLM``
calls 56 sublayers per token, more than the arithmetic of a small model costs.

Inside :func:`direct_calls`, :func:`call_layer` goes straight to
``layer.call``. That skips nothing that matters only when ``__call__`` would
have been a no-op, which :func:`direct_calls_allowed` checks for a model:

* every layer is built (the model has run once);
* every dtype policy computes in its variable dtype (no autocast to undo);
* no layer is quantized (``__call__`` routes those to ``quantized_call``);
* no Keras mask is needed: the cached path passes its padding explicitly
  (``padding_mask``, ``memory_mask``) and never reads ``x._keras_mask``.

:func:`~keras_decoder.generation.generate` also owns its KV cache, which no
one else can see, so inside ``direct_calls(in_place=True)`` the attention
layers write new keys and values into the cache tensors (torch) instead of
copying the whole ``(B, max_len, Hkv, D)`` cache at every step as
``ops.slice_update`` must.

Outside the context :func:`call_layer` is exactly ``layer(*args, **kwargs)``.
"""

import contextlib
import contextvars

import keras

_MODE = contextvars.ContextVar("keras_decoder_direct_calls", default=None)


@contextlib.contextmanager
def direct_calls(in_place=False):
    """Sublayers are called through ``layer.call`` (and, with ``in_place``,
    caches are written in place) until the context exits."""
    token = _MODE.set({"in_place": bool(in_place)})
    try:
        yield
    finally:
        _MODE.reset(token)


def call_layer(layer, *args, **kwargs):
    """``layer(*args, **kwargs)``, or ``layer.call(...)`` inside :func:`direct_calls`."""
    if _MODE.get() is None:
        return layer(*args, **kwargs)
    return layer.call(*args, **kwargs)


def in_place_cache_writes():
    """True inside ``direct_calls(in_place=True)``: the cache may be mutated."""
    mode = _MODE.get()
    return mode is not None and mode["in_place"]


def direct_calls_allowed(model):
    """Whether ``model``'s layers may skip ``Layer.__call__`` (see the module docstring)."""
    if not isinstance(model, keras.layers.Layer):  # a duck-typed model: leave it alone
        return False
    layers = [model] + list(model._flatten_layers(include_self=False, recursive=True))
    for layer in layers:
        policy = layer.dtype_policy
        if not layer.built or policy.compute_dtype != policy.variable_dtype:
            return False
        if getattr(layer, "quantization_mode", None) is not None:
            return False
    return True
