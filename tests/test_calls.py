"""The eager decoding fast path (keras_decoder._calls): direct sublayer calls and
in-place cache writes give the same numbers as ``Layer.__call__`` and copies.

``direct_calls`` is used by ``generate`` on torch only (TensorFlow and JAX trace
the decode once), but it is plain Python around ``layer.call``, so its
equivalence is checked on every backend. In-place writes need mutable tensors:
they are checked on torch, and on the other backends ``generate`` must not
turn them on.
"""

import keras
import numpy as np
import pytest

from keras_checks import to_numpy
from keras_decoder import _calls
from keras_decoder import generation as gen
from keras_decoder.models import DecoderOnlyLM, Seq2SeqTransformer

V, L, C, H, F = 40, 16, 32, 4, 64
TORCH = keras.backend.backend() == "torch"


def _lm(**kwargs):
    model = DecoderOnlyLM(V, L, C, H, F, num_layers=2, **kwargs)
    model(np.ones((1, 1), "int32"))
    return model


def _s2s(**kwargs):
    model = Seq2SeqTransformer(V, V, L, C, H, F, num_encoder_layers=1, num_decoder_layers=2,
                               **kwargs)
    model({"encoder_input_ids": np.ones((1, 1), "int32"),
           "decoder_input_ids": np.ones((1, 1), "int32")})
    return model


MODELS = {
    "lm_learned": lambda: _lm(),
    "lm_rotary_gqa_untied": lambda: _lm(position="rotary", num_kv_heads=2,
                                        tie_embeddings=False),
    "lm_sinusoidal": lambda: _lm(position="sinusoidal"),
    "s2s_sequential": lambda: _s2s(),
    "s2s_parallel_post_norm": lambda: _s2s(interaction="parallel", norm_first=False),
    "s2s_joint": lambda: _s2s(interaction="joint"),
}


def _decode(model, prompt, source, steps):
    """Prefill the left-padded prompt, then ``steps`` single tokens; every logit and the cache."""
    batch, length = prompt.shape
    pads = (prompt == 0).sum(axis=1).astype("int32")
    if source is None:
        cache = model.init_cache(batch, L)
    else:
        cache = model.init_cache(batch, L, encoder_input_ids=source)
    logits, cache = model.call_with_cache(prompt, cache, 0, start_index=-pads)
    out = [to_numpy(logits)]
    token = np.argmax(out[-1][:, -1, 1:], axis=-1).astype("int32")[:, None] + 1
    for t in range(steps):
        logits, cache = model.call_with_cache(token, cache, length + t,
                                              start_index=length + t - pads)
        out.append(to_numpy(logits))
        token = np.argmax(out[-1][:, -1, 1:], axis=-1).astype("int32")[:, None] + 1
    layers = [to_numpy(x) for pair in cache["self_attention"] for x in pair]
    return np.concatenate(out, axis=1), layers


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_direct_calls_give_the_same_logits_and_cache(kind):
    seed = int(np.random.default_rng().integers(2**31 - 1))
    keras.utils.set_random_seed(seed)
    model = MODELS[kind]()
    assert _calls.direct_calls_allowed(model)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, V, (3, 5)).astype("int32")
    prompt[0, :2] = 0  # left padding, as generate aligns prompts
    prompt[2, :4] = 0
    source = rng.integers(1, V, (3, 7)).astype("int32") if kind.startswith("s2s") else None
    if source is not None:
        source[1, 5:] = 0
    want_logits, want_cache = _decode(model, prompt, source, steps=4)
    with _calls.direct_calls(in_place=TORCH):
        got_logits, got_cache = _decode(model, prompt, source, steps=4)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_cache, want_cache):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cache_is_copied_outside_the_context_and_written_in_place_inside():
    keras.utils.set_random_seed(int(np.random.default_rng().integers(2**31 - 1)))
    model = _lm()
    cache = model.init_cache(2, L)
    token = np.array([[3], [4]], "int32")
    _, new = model.call_with_cache(token, cache, 0)
    key_before = to_numpy(cache["self_attention"][0][0])
    assert not np.any(key_before), "call_with_cache wrote into the caller's cache"
    assert np.any(to_numpy(new["self_attention"][0][0])[:, 0])
    if TORCH:
        with _calls.direct_calls(in_place=True):
            _, inside = model.call_with_cache(token, cache, 0)
        assert inside["self_attention"][0][0] is cache["self_attention"][0][0]
        np.testing.assert_array_equal(to_numpy(cache["self_attention"][0][0]),
                                      to_numpy(new["self_attention"][0][0]))
    else:  # immutable tensors: generate never asks for in-place writes here
        with gen._eager_decoding(model):
            assert not _calls.in_place_cache_writes()


def test_generate_on_torch_skips_layer_call_with_the_same_tokens(monkeypatch):
    keras.utils.set_random_seed(int(np.random.default_rng().integers(2**31 - 1)))
    model = _lm()
    prompt = np.array([[0, 5, 7], [2, 9, 4]], "int32")
    calls = []
    original = keras.layers.Layer.__call__

    def counting(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras.layers.Layer, "__call__", counting)
    fast, fast_scores = gen.generate(model, prompt, max_new_tokens=6, return_scores=True)
    fast_calls = len(calls)
    monkeypatch.setattr(gen, "direct_calls_allowed", lambda model: False)
    gen._compiled_decodes(model).clear()  # trace again (TensorFlow, JAX)
    calls.clear()
    slow, slow_scores = gen.generate(model, prompt, max_new_tokens=6, return_scores=True)
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_allclose(fast_scores, slow_scores, rtol=1e-5, atol=1e-5)
    assert len(calls) > 0
    if TORCH:
        assert fast_calls == 0, f"Layer.__call__ ran {fast_calls} times: {sorted(set(calls))}"
    else:  # traced once either way
        assert fast_calls > 0


def test_direct_calls_only_where_layer_call_would_be_a_no_op():
    assert _calls.direct_calls_allowed(_lm())
    unbuilt = DecoderOnlyLM(V, L, C, H, F, num_layers=1)
    assert not _calls.direct_calls_allowed(unbuilt)
    mixed = DecoderOnlyLM(V, L, C, H, F, num_layers=1, dtype="mixed_bfloat16")
    mixed(np.ones((1, 1), "int32"))
    assert not _calls.direct_calls_allowed(mixed)  # autocast happens in __call__
    assert not _calls.direct_calls_allowed(object())
    assert not _calls.in_place_cache_writes()
    with _calls.direct_calls():
        assert not _calls.in_place_cache_writes()
        with _calls.direct_calls(in_place=True):
            assert _calls.in_place_cache_writes()
        assert not _calls.in_place_cache_writes()
