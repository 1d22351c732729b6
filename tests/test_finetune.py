"""keras_decoder.finetune: prompt loss masks, LoRA through Keras, freezing."""

import keras
import numpy as np
import pytest
from keras import ops

from backend_info import BACKEND, JIT_BACKENDS
from keras_decoder.finetune import enable_lora, freeze, prompt_loss_mask, trainable_fraction
from keras_decoder.models import DecoderOnlyLM
from keras_decoder.training import masked_loss


def test_prompt_loss_mask_counts_only_response_tokens(rng):
    lengths = rng.integers(0, 7, size=5).astype("int32")
    got = ops.convert_to_numpy(prompt_loss_mask(lengths, 6))
    expected = (np.arange(6)[None, :] >= lengths[:, None]).astype("float32")
    assert got.dtype == np.float32 and got.shape == (5, 6)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("lengths, total, pattern", [
    (np.array([2, 9], "int32"), 6, r"total_len=6.*\[2, 9\]"),
    (np.array([[2]], "int32"), 6, r"rank 1.*\(1, 1\)"),
    (np.array([1.0]), 6, r"integer.*float"),
])
def test_prompt_loss_mask_rejects_bad_input(lengths, total, pattern):
    with pytest.raises(ValueError, match=pattern):
        prompt_loss_mask(lengths, total)


def _lm():
    model = DecoderOnlyLM(vocab_size=500, max_length=16, dim=64, num_heads=4, ff_dim=128, num_layers=2)
    model.build((None, 16))
    return model


def test_enable_lora_trains_only_low_rank_weights(rng, tmp_path):
    model = _lm()
    base = {w.path: np.array(w) for w in model.weights}
    chosen = enable_lora(model, rank=4)
    assert {layer.name for layer in chosen} == {"query", "value"} and len(chosen) == 4
    fraction = trainable_fraction(model)
    assert 0 < fraction < 0.05
    assert all("lora" in w.path for w in model.trainable_weights)

    ids = rng.integers(1, 500, size=(8, 16)).astype("int32")
    weight = prompt_loss_mask(np.full((8,), 6, "int32"), 16)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=masked_loss(),
                  jit_compile=BACKEND in JIT_BACKENDS)
    before = ops.convert_to_numpy(model(ids))
    model.fit(ids, ids, sample_weight=weight, epochs=3, batch_size=8, verbose=0)
    after = ops.convert_to_numpy(model(ids))
    assert not np.allclose(before, after)  # LoRA changed the behaviour ...
    for w in model.weights:  # ... while every base weight is bit-identical
        if w.path in base:
            np.testing.assert_array_equal(np.array(w), base[w.path], err_msg=w.path)

    path = tmp_path / "lora.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(ids)), after, rtol=1e-5, atol=1e-5)


def test_enable_lora_names_the_layers_it_could_use():
    with pytest.raises(ValueError, match=r"\('nope',\).*query"):
        enable_lora(_lm(), rank=2, targets=("nope",))
    with pytest.raises(ValueError, match=r"rank=0"):
        enable_lora(_lm(), rank=0)


def test_freeze_and_trainable_fraction():
    model = _lm()
    assert trainable_fraction(model) == 1.0
    freeze(model, except_=("final_norm",))
    names = {w.path for w in model.trainable_weights}
    assert names and all("final_norm" in n for n in names)
    expected = sum(int(np.prod(w.shape)) for w in model.trainable_weights) / sum(
        int(np.prod(w.shape)) for w in model.weights)
    assert trainable_fraction(model) == pytest.approx(expected)
    freeze(model)
    assert trainable_fraction(model) == 0.0
