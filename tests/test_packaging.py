"""The install promises: extras, the two README commands, backend-neutral layers."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements):
    return {re.split(r"[=<>!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_core_dependencies_are_keras_numpy_matplotlib():
    assert _names(PYPROJECT["project"]["dependencies"]) == {"keras", "numpy", "matplotlib"}
    assert PYPROJECT["project"]["requires-python"] == ">=3.10"


def test_jax_extra_brings_no_tensorflow_and_torch_is_pinned():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "tensorflow" not in _names(extras["jax"])
    assert extras["torch"] == ["torch==2.13.0"]
    assert {"tensorflow", "tensorflow-text"} <= _names(extras["text"])
    assert {"tensorflow", "tensorflow-text", "jax", "torch", "jupyterlab", "nbclient",
            "nbformat"} <= _names(extras["course"])
    assert {"pytest", "nbval", "pytest-xdist", "hypothesis"} <= _names(extras["test"])


def test_readme_setup_is_exactly_make_lab_and_make_test():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(?:[A-Z_]+=\S+ )?make \w+", setup, flags=re.M)
    assert sorted({c.split()[-1] for c in commands}) == ["lab", "test"]


BACKEND_IMPORT = r"^(\s*)(import|from)\s+(tensorflow|jax|torch)\b"

# generation.py compiles the whole decode loop with the running backend's own
# compiler (tf.function(jit_compile=True), jax.jit, torch.inference_mode):
# that is orchestration, not a layer, and Keras has no portable equivalent.
# It may import the backend only lazily, inside the function that compiles.
LAZY_BACKEND_IMPORTS = {"generation.py"}


def test_layers_import_no_backend_specific_module():
    allowed = {"text.py", "data.py"}
    for path in (ROOT / "keras_decoder").rglob("*.py"):
        if path.name in allowed or "grading" in path.parts:
            continue
        for indent, *_ in re.findall(BACKEND_IMPORT, path.read_text(), re.M):
            assert path.name in LAZY_BACKEND_IMPORTS and indent, (
                f"{path.relative_to(ROOT)} imports a backend module"
                + (" at module level" if path.name in LAZY_BACKEND_IMPORTS else ""))


def test_generation_imports_no_backend_module_keras_does_not():
    # Importing generation.py must not pull in a backend module that Keras
    # itself did not load (the compilers are imported lazily, per backend).
    code = (
        "import sys, keras\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        "import keras_decoder.generation\n"
        "after = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted((after - before) & {'tensorflow', 'jax', 'torch'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ))
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
