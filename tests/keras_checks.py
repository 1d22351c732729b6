"""Checks every public layer and model gets (CONVENTIONS §5).

* a ``.keras`` save/load round trip with identical outputs;
* one ``fit`` step, with ``jit_compile=True`` where the backend has it;
* a mixed-precision (``mixed_bfloat16``) call without NaN;
* a save under this backend and a load under another, in a subprocess.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np

BACKEND = keras.backend.backend()
JIT = BACKEND in ("tensorflow", "jax")  # torch: jit_compile would mean torch.compile
# Where a saved model is loaded again. Torch and TensorFlow run eagerly without
# compiling each op (JAX compiles every op of a first eager call), so the check
# stays cheap; the three runs together cover tf→torch, jax→torch, torch→tf.
NEXT_BACKEND = {"tensorflow": "torch", "jax": "torch", "torch": "tensorflow"}[BACKEND]


def to_numpy(x):
    return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), x)


def assert_all_close(a, b, rtol=1e-5, atol=1e-5):
    for x, y in zip(keras.tree.flatten(to_numpy(a)), keras.tree.flatten(to_numpy(b))):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def roundtrip(model, inputs, tmp_path, name="model.keras"):
    """Save, load, and check the loaded model gives the same outputs."""
    expected = to_numpy(model(inputs, training=False))
    path = str(Path(tmp_path) / name)
    model.save(path)
    loaded = keras.models.load_model(path)
    assert_all_close(loaded(inputs, training=False), expected, rtol=1e-6, atol=1e-6)
    return loaded


def fit_step(model, x, y, sample_weight=None, loss=None):
    """One jit-compiled (where possible) optimisation step; returns the loss.

    Plain SGD: XLA compile time grows with the graph, and Adam's update adds
    about ten ops per variable.
    """
    loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(1e-2), loss=loss, jit_compile=JIT)
    history = model.fit(x, y, sample_weight=sample_weight, batch_size=len(y), epochs=1,
                        verbose=0)
    value = history.history["loss"][-1]
    assert np.isfinite(value), value
    return value


def assert_finite(x):
    for leaf in keras.tree.flatten(to_numpy(x)):
        leaf = np.asarray(leaf, np.float32)
        assert np.all(np.isfinite(leaf)), "non-finite values"


def set_weights_from_seed(model, seed=0, scale=0.2):
    """Overwrite every weight with seeded normal noise (deterministic numbers)."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign((rng.standard_normal(tuple(w.shape)) * scale).astype(w.dtype))


CROSS_BACKEND_SCRIPT = r"""
import json, sys
import numpy as np
import keras
import keras_decoder  # registers the classes
spec = json.load(open(sys.argv[1]))
worst = {}
for item in spec:
    model = keras.models.load_model(item["path"])
    data = np.load(item["data"], allow_pickle=False)
    inputs = {k[3:]: data[k] for k in data.files if k.startswith("in_")}
    if list(inputs) == [""]:
        inputs = inputs[""]
    out = keras.tree.flatten(model(inputs, training=False))
    outs = [np.asarray(keras.ops.convert_to_numpy(o)) for o in out]
    expected = [data[f"out_{i}"] for i in range(len(outs))]
    worst[item["path"]] = max(float(np.max(np.abs(a - b))) for a, b in zip(outs, expected))
print("RESULT " + json.dumps(worst))
"""


def check_loads_under_other_backend(models_and_inputs, tmp_path, atol=1e-4):
    """Save each ``(model, inputs)`` here; load and run them under ``NEXT_BACKEND``.

    ``inputs`` is an array or a dict of arrays. One subprocess for all models.
    """
    tmp_path = Path(tmp_path)
    spec = []
    for i, (model, inputs) in enumerate(models_and_inputs):
        path, data = tmp_path / f"m{i}.keras", tmp_path / f"m{i}.npz"
        model.save(str(path))
        outputs = keras.tree.flatten(to_numpy(model(inputs, training=False)))
        arrays = {f"out_{j}": o for j, o in enumerate(outputs)}
        if isinstance(inputs, dict):
            arrays.update({f"in_{k}": np.asarray(v) for k, v in inputs.items()})
        else:
            arrays["in_"] = np.asarray(inputs)
        np.savez(data, **arrays)
        spec.append({"path": str(path), "data": str(data)})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "load.py").write_text(CROSS_BACKEND_SCRIPT)
    env = dict(os.environ, KERAS_BACKEND=NEXT_BACKEND, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "spec.json")],
                          env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parent.parent))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    worst = json.loads(lines[-1][len("RESULT "):])
    for path, value in worst.items():
        assert value <= atol, f"{path} under {NEXT_BACKEND}: max |diff| {value}"
    return worst
