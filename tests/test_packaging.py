"""The install promises: extras, the two README commands, backend-neutral layers."""

import re
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


def test_layers_import_no_backend_specific_module():
    allowed = {"text.py", "data.py"}
    for path in (ROOT / "keras_decoder").rglob("*.py"):
        if path.name in allowed or "grading" in path.parts:
            continue
        source = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(tensorflow|jax|torch)\b", source, re.M), path


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
