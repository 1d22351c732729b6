"""keras_decoder.distribution: stable weight paths, layout maps, and sharded training steps.

The equivalence check (one step on 1 device == DataParallel == ModelParallel
on 8 virtual CPU devices) runs ``tests/distribution_check.py`` in a child
process with ``KERAS_BACKEND=jax``: the device count must be set before JAX is
imported, and ``keras.distribution`` is JAX-only (the issue asks for this
test on JAX). It runs in the JAX pass of ``make test``; the layout-map tests
run on every backend.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_decoder import distribution
from keras_decoder.models import DecoderOnlyLM, Seq2SeqTransformer

CHECK = Path(__file__).with_name("distribution_check.py")
SIZES = dict(dim=16, num_heads=4, ff_dim=32, max_length=8)


def _lm(**kwargs):
    model = DecoderOnlyLM(vocab_size=20, num_layers=2, **{**SIZES, **kwargs})
    model(np.ones((1, 5), "int32"))
    return model


def _seq2seq(**kwargs):
    model = Seq2SeqTransformer(20, 24, num_encoder_layers=1, num_decoder_layers=2,
                               **{**SIZES, **kwargs})
    ids = np.ones((1, 5), "int32")
    model({"encoder_input_ids": ids, "decoder_input_ids": ids})
    return model


def _relative_paths(model):
    """Weight paths without the model's own (auto-numbered) name."""
    return [w.path.split("/", 1)[1] for w in model.weights]


def _mesh():
    # Explicit device names: `list_devices()` is not implemented on every backend.
    return keras.distribution.DeviceMesh((2, 4), ("batch", "model"),
                                         devices=[f"cpu:{i}" for i in range(8)])


BUILDERS = {
    "lm_learned": lambda: _lm(),
    "lm_rotary_gqa_untied": lambda: _lm(position="rotary", num_kv_heads=2, tie_embeddings=False),
    "seq2seq_sequential": lambda: _seq2seq(),
    "seq2seq_parallel": lambda: _seq2seq(interaction="parallel"),
    "seq2seq_joint_postnorm": lambda: _seq2seq(interaction="joint", norm_first=False),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_weight_paths_are_stable_and_unique(name):
    first, second = BUILDERS[name](), BUILDERS[name]()
    assert first.name != second.name  # Keras numbers the models ...
    paths = _relative_paths(first)
    assert paths == _relative_paths(second)  # ... but nothing below them
    assert len(set(paths)) == len(paths)
    assert all(not re.search(r"_\d+(/|$)", p.replace("block_", "block")) for p in paths), paths


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_layout_map_covers_the_big_weights(name):
    model = BUILDERS[name]()
    layouts = distribution.layout_map(model, _mesh())  # a model: GQA heads are checked
    assert isinstance(layouts, keras.distribution.LayoutMap)
    used = set()
    for weight in model.weights:
        layout = layouts[weight.path]  # raises if two rules match one weight
        is_matrix = len(weight.shape) >= 2 and "norm" not in weight.path
        few_kv_heads = re.search(r"/(key|value)/", weight.path) and model.num_kv_heads == 2
        if few_kv_heads:
            assert layout is None, weight.path
            continue
        if layout is None:
            assert not is_matrix, f"{weight.path} {weight.shape} is not sharded"
            continue
        assert isinstance(layout, keras.distribution.TensorLayout)
        assert len(layout.axes) == len(weight.shape), (weight.path, layout.axes)
        assert layout.axes.count("model") == 1
        dim = weight.shape[layout.axes.index("model")]
        assert dim % 4 == 0, (weight.path, weight.shape, layout.axes)
        used.update(p for p in layouts if re.fullmatch(p, weight.path))
    # The sharded dimensions are heads, hidden units and the width C.
    for weight in model.weights:
        path, layout = weight.path, layouts[weight.path]
        if path.endswith("query/kernel"):
            assert layout.axes == (None, "model", None)  # (C, H, D): heads
        if path.endswith("feed_forward/hidden/kernel"):
            assert layout.axes == (None, "model")  # (C, F): hidden units
        if path.endswith("attention_output/kernel"):
            assert layout.axes == ("model", None, None)  # (H, D, C): heads
    assert used  # at least one rule applied


def test_layout_map_options_and_errors():
    mesh = keras.distribution.DeviceMesh((8,), ("shards",), devices=[f"cpu:{i}" for i in range(8)])
    layouts = distribution.layout_map(DecoderOnlyLM, mesh)  # the class works, last axis default
    assert layouts[".../decoder_block_0/self_attention/query/kernel"].axes == (None, "shards", None)
    no_kv = distribution.layout_map("lm", mesh, shard_kv_heads=False)
    assert no_kv["m/decoder_block_0/self_attention/key/kernel"] is None
    assert no_kv["m/decoder_block_0/self_attention/query/kernel"] is not None
    gqa = _lm(num_kv_heads=2)  # 2 key/value heads cannot be cut 8 ways
    assert distribution.layout_map(gqa, mesh)["m/decoder_block_0/self_attention/key/kernel"] is None
    assert distribution.layout_map(_lm(num_heads=8), mesh)["m/decoder_block_0/self_attention/key/kernel"]
    with pytest.raises(ValueError, match="model_kind"):
        distribution.layout_map("vision_transformer", mesh)
    with pytest.raises(ValueError, match="model_axis"):
        distribution.layout_map("lm", mesh, model_axis="model")
    with pytest.raises(ValueError, match="DeviceMesh"):
        distribution.layout_map("lm", (2, 4))


def test_sharded_training_step_matches_one_device_on_jax():
    if keras.backend.backend() != "jax":
        pytest.skip(reason="keras.distribution is JAX-only and this check always runs in a child "
                    "JAX process: the JAX pass of `make test` runs it; running the same JAX "
                    "computation again from the other passes would test nothing new")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, str(CHECK)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=CHECK.parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(distribution.MODEL_KINDS)
    for kind, result in results.items():
        assert result["devices"] == 8
        # The step really moved the weights, so agreement within 1e-5 means something.
        assert result["step_size"] > 1e-2, kind
        for mode in ("data_parallel", "model_parallel"):
            assert abs(result[mode]["loss"] - result["loss_single"]) <= 1e-5, (kind, mode, result)
            assert result[mode]["max_weight_diff"] <= 1e-5, (kind, mode, result)
        sharded = result["model_parallel"]["sharded"]
        assert any(p.endswith("query/kernel") for p in sharded), sharded
        assert any(p.endswith("feed_forward/hidden/kernel") for p in sharded), sharded
        assert any(p.endswith("token_embedding/embeddings") for p in sharded), sharded
