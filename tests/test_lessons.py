"""The lessons' contract: structure, compared outputs, and JupyterLab serving them.

The lessons themselves run under strict nbval (``make test`` passes
``lessons/*.ipynb --nbval``). These tests check what nbval cannot:

* at least 60% of the code cells that have outputs are *compared* by nbval,
  that is, not tagged ``nbval-ignore-output`` or ``nbval-skip``;
* every lesson has the required shape: an opening (what you will learn,
  prerequisites, which sections of the seed article it covers), an "About the
  article" note, at least three ``assert`` cells, at least one figure, and a
  closing summary that links to an exercise set that exists;
* JupyterLab, started headless the way ``make lab`` starts it (the repository
  as root, opened on ``lessons/``), serves every lesson, and the exercise
  notebooks the lessons link to, over its REST API.

Nothing here imports Keras: the checks read the committed notebooks as JSON.
"""

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LESSONS = ROOT / "lessons"
EXPECTED = [
    "00_backends_and_keras_masking",
    "01_decoder_inputs",
    "02_positions",
    "03_masks",
    "04_attention",
    "05_interacting_attention",
    "06_rnn_decoders",
    "07_transformer_decoder",
    "08_training_translation",
    "09_generation",
    "10_advanced_masks",
    "11_finetuning",
    "12_scaling_out",
]
MIN_COMPARED_SHARE = 0.60
NOT_COMPARED_TAGS = {"nbval-ignore-output", "nbval-skip"}
NOT_COMPARED_MARKERS = ("# NBVAL_IGNORE_OUTPUT", "# NBVAL_SKIP")  # nbval's comment form
BACKEND_NAMES = re.compile(r"\b(tensorflow|jax|torch)\b", re.IGNORECASE)
ASSERTION = re.compile(r"^\s*(assert\b|np\.testing\.assert_)", re.MULTILINE)


def _lesson_paths():
    return sorted(p for p in LESSONS.glob("[0-9][0-9]_*.ipynb"))


def _load(name):
    return json.loads((LESSONS / f"{name}.ipynb").read_text(encoding="utf-8"))


def _source(cell):
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _text(output):
    """The text nbval compares for one output: streams and text/plain."""
    if output.get("output_type") == "stream":
        text = output.get("text", "")
    else:
        text = output.get("data", {}).get("text/plain", "")
    return "".join(text) if isinstance(text, list) else text


def _is_compared(cell):
    tags = set(cell.get("metadata", {}).get("tags", []))
    first_line = _source(cell).lstrip().split("\n", 1)[0].strip()
    return not (tags & NOT_COMPARED_TAGS) and first_line not in NOT_COMPARED_MARKERS


def compared_share(notebook):
    """``(compared, with_outputs)``: code cells with outputs, and those nbval compares."""
    with_outputs = [c for c in notebook["cells"] if c["cell_type"] == "code" and c.get("outputs")]
    compared = [c for c in with_outputs if _is_compared(c)]
    return len(compared), len(with_outputs)


def test_every_lesson_is_there():
    names = [p.stem for p in _lesson_paths()]
    assert names[: len(EXPECTED)] == EXPECTED, f"Expected the lessons {EXPECTED}. Found: {names}"


@pytest.mark.parametrize("name", EXPECTED)
def test_compared_share(name):
    compared, total = compared_share(_load(name))
    assert total, f"{name}: no code cell has an output; nbval would compare nothing"
    share = compared / total
    assert share >= MIN_COMPARED_SHARE, (
        f"{name}: only {compared} of {total} code cells with outputs are compared by nbval "
        f"({share:.0%} < {MIN_COMPARED_SHARE:.0%}). Tag a cell nbval-ignore-output only when "
        "its output truly depends on the backend or the clock."
    )


@pytest.mark.parametrize("name", EXPECTED)
def test_compared_outputs_do_not_name_a_backend(name):
    """A compared output that names a backend cannot be identical on all three."""
    for index, cell in enumerate(_load(name)["cells"]):
        if cell["cell_type"] != "code" or not _is_compared(cell):
            continue
        for output in cell.get("outputs", []):
            assert output.get("name") != "stderr", f"{name} cell {index}: committed stderr output"
            found = BACKEND_NAMES.search(_text(output))
            assert not found, (
                f"{name} cell {index}: a compared output names the backend {found.group(0)!r}; "
                "tag the cell nbval-ignore-output or print something backend-independent"
            )


@pytest.mark.parametrize("name", EXPECTED)
def test_opening(name):
    cells = _load(name)["cells"]
    assert cells[0]["cell_type"] == "markdown", f"{name}: the first cell must be the opening (markdown)"
    opening = _source(cells[0])
    assert opening.lstrip().startswith("# "), f"{name}: the opening starts with the lesson's title"
    for heading in ("What you will learn", "Prerequisites", "Where this sits in the article"):
        assert heading in opening, f"{name}: the opening lacks {heading!r}"
    assert "§" in opening, f"{name}: the opening names the article's sections it covers (§...)"


@pytest.mark.parametrize("name", EXPECTED)
def test_about_the_article_note(name):
    notes = [c for c in _load(name)["cells"]
             if c["cell_type"] == "markdown" and "**About the article" in _source(c)]
    assert notes, f"{name}: no clearly marked 'About the article' note"


@pytest.mark.parametrize("name", EXPECTED)
def test_closing_links_to_an_existing_exercise_set(name):
    cells = _load(name)["cells"]
    closing = _source(cells[-1])
    assert cells[-1]["cell_type"] == "markdown" and "## Summary" in closing, (
        f"{name}: the last cell must be the summary"
    )
    links = re.findall(r"\]\((\.\./exercises/[^)]+\.ipynb)\)", closing)
    assert links, f"{name}: the closing does not link to its exercise set (../exercises/NN_topic.ipynb)"
    for link in links:
        assert (LESSONS / link).resolve().is_file(), f"{name}: the exercise set {link} does not exist"
    assert "Run time" in closing and "TIMES_" not in closing, f"{name}: the closing lists its run times"


@pytest.mark.parametrize("name", EXPECTED)
def test_assert_cells(name):
    asserting = [c for c in _load(name)["cells"]
                 if c["cell_type"] == "code" and ASSERTION.search(_source(c))]
    assert len(asserting) >= 3, f"{name}: {len(asserting)} assert cells; at least 3 back the text"


@pytest.mark.parametrize("name", EXPECTED)
def test_has_a_figure(name):
    figures = [o for c in _load(name)["cells"] if c["cell_type"] == "code"
               for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert figures, f"{name}: no figure (a mask, a heatmap or a curve drawn with matplotlib)"


# ---------------------------------------------------------------------------
# JupyterLab serves the lessons.
# ---------------------------------------------------------------------------
def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, token, timeout=5.0):
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def _start_lab(tmp_path, token):
    """Start JupyterLab on a free loopback port; return ``(process, base_url)`` once it answers."""
    jupyter = Path(sys.executable).parent / "jupyter"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    for _attempt in range(3):  # the port could be taken between choosing and binding it
        port = _free_port()
        command = [
            str(jupyter), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
            "--ServerApp.port_retries=0", f"--ServerApp.token={token}",
            f"--ServerApp.root_dir={ROOT}", "--LabApp.default_url=/lab/tree/lessons",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-root")  # as `make lab` does on root-only machines
        log = open(tmp_path / f"lab-{port}.log", "w")
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline and process.poll() is None:
            try:
                _get(f"{base}/api/status", token)
                return process, base
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    pytest.fail("JupyterLab did not start; see the lab-*.log files in " + str(tmp_path))


def _stop_lab(process, base, token):
    try:
        request = urllib.request.Request(
            f"{base}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"})
        urllib.request.urlopen(request, timeout=10).close()
        process.wait(timeout=30)
    except Exception:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _linked_exercises():
    links = set()
    for name in EXPECTED:
        closing = _source(_load(name)["cells"][-1])
        links.update(Path(link).name for link in re.findall(r"\]\(\.\./exercises/([^)]+\.ipynb)\)", closing))
    return sorted(links)


def test_jupyterlab_serves_every_lesson(tmp_path):
    token = secrets.token_hex(16)
    process, base = _start_lab(tmp_path, token)
    try:
        listing = _get(f"{base}/api/contents/lessons", token, timeout=30)
        served = {item["name"]: item["type"] for item in listing["content"]}
        for name in EXPECTED:
            assert served.get(f"{name}.ipynb") == "notebook", (
                f"JupyterLab does not serve lessons/{name}.ipynb as a notebook. Served: {sorted(served)}"
            )
            notebook = _get(f"{base}/api/contents/lessons/{name}.ipynb", token, timeout=30)
            assert notebook["type"] == "notebook" and notebook["content"]["cells"], name
        exercises = {item["name"] for item in _get(f"{base}/api/contents/exercises", token, timeout=30)["content"]}
        missing = [name for name in _linked_exercises() if name not in exercises]
        assert not missing, f"The lessons link to exercise notebooks that JupyterLab does not serve: {missing}"
        request = urllib.request.Request(f"{base}/lab/tree/lessons", headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:  # the page `make lab` opens
            assert response.status == 200
        with pytest.raises(urllib.error.HTTPError):  # the token is really required
            with urllib.request.urlopen(f"{base}/api/contents/lessons", timeout=10):
                pass
    finally:
        _stop_lab(process, base, token)
    assert process.poll() is not None, "JupyterLab is still running after shutdown"


def test_conftest_leaves_stderr_out_of_the_comparison():
    """lessons/conftest.py adds 'stderr' to what nbval skips, for notebooks only."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("lessons_conftest", LESSONS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    notebook = types.SimpleNamespace(fspath=LESSONS / "03_masks.ipynb", skip_compare=("metadata", "traceback"))
    module.pytest_collectstart(notebook)
    assert "stderr" in notebook.skip_compare and "metadata" in notebook.skip_compare
    other = types.SimpleNamespace(fspath=ROOT / "tests" / "test_masks.py", skip_compare=("metadata",))
    module.pytest_collectstart(other)
    assert other.skip_compare == ("metadata",)
    sanitize = (LESSONS / "nbval_sanitize.cfg").read_text()
    assert "ipykernel_" in sanitize  # the temporary paths of warnings are sanitized
