"""One training step on 1 device, under DataParallel and under ModelParallel (JAX, 8 CPU devices).

Run by ``tests/test_distribution.py`` in its own process, because the device
count must be set before JAX is imported::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax python tests/distribution_check.py

Prints one JSON object: for each model kind, the loss and the largest weight
difference of each distributed run against the single-device run, how far the
step moved the weights, and which weights were really sharded.
"""

import json
import os
import sys
from pathlib import Path

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_decoder import distribution as kd_distribution  # noqa: E402
from keras_decoder.models import DecoderOnlyLM, Seq2SeqTransformer  # noqa: E402
from keras_decoder.training import masked_loss  # noqa: E402

SIZES = dict(dim=32, num_heads=4, ff_dim=64, max_length=12)
BATCH, LENGTH, VOCAB = 8, 10, 50


def _batch(kind, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(BATCH, LENGTH)).astype("int32")
    lengths = rng.integers(3, LENGTH + 1, size=BATCH)
    ids[np.arange(LENGTH)[None, :] >= lengths[:, None]] = 0  # right padding
    labels = rng.integers(1, VOCAB, size=(BATCH, LENGTH)).astype("int32")
    weights = (ids != 0).astype("float32")
    if kind == "decoder_only_lm":
        return ids, labels, weights
    source = rng.integers(1, VOCAB, size=(BATCH, LENGTH - 2)).astype("int32")
    source[:, -1] = 0
    return {"encoder_input_ids": source, "decoder_input_ids": ids}, labels, weights


def _model(kind):
    if kind == "decoder_only_lm":
        return DecoderOnlyLM(vocab_size=VOCAB, num_layers=2, tie_embeddings=False, **SIZES)
    return Seq2SeqTransformer(source_vocab_size=VOCAB, target_vocab_size=VOCAB,
                              num_encoder_layers=1, num_decoder_layers=1, **SIZES)


def _step(kind, weights, batch):
    """Build, load ``weights``, one SGD step; returns (loss, weights after, model)."""
    x, y, w = batch
    model = _model(kind)
    model(x)
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=masked_loss(), jit_compile=True)
    loss = model.train_on_batch(x, y, sample_weight=w)
    return float(loss), [np.asarray(v) for v in model.get_weights()], model


def _max_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


def run(kind):
    keras.utils.set_random_seed(0)
    batch = _batch(kind, seed=1)
    reference = _model(kind)
    reference(batch[0])
    initial = [np.asarray(v) for v in reference.get_weights()]
    loss_1, after_1, _ = _step(kind, initial, batch)

    devices = keras.distribution.list_devices("cpu")
    result = {"devices": len(devices), "loss_single": loss_1,
              "step_size": _max_diff(after_1, initial)}
    with keras.distribution.DataParallel(devices=devices).scope():
        loss, after, _ = _step(kind, initial, batch)
    result["data_parallel"] = {"loss": loss, "max_weight_diff": _max_diff(after, after_1)}

    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices=devices)
    layouts = kd_distribution.layout_map(kind, mesh)
    with keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch").scope():
        loss, after, model = _step(kind, initial, batch)
    sharded = sorted(
        v.path.split("/", 1)[1] for v in model.weights
        if "model" in tuple(getattr(v.value.sharding, "spec", ()))
    )
    result["model_parallel"] = {"loss": loss, "max_weight_diff": _max_diff(after, after_1),
                                "sharded": sharded, "num_weights": len(model.weights)}
    return result


if __name__ == "__main__":
    assert len(jax.devices("cpu")) == 8, jax.devices()
    print(json.dumps({kind: run(kind) for kind in kd_distribution.MODEL_KINDS}))
