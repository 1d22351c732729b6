"""Tests of ``keras_decoder.grading``: the exercise format, ``ex.check``, the
notebook generator, the sandboxed grader and the ``keras-decoder`` CLI.

Most tests run in this process and need no kernel. The end-to-end tests grade
real notebooks (the solution, the learner version and an adversarial set) in
fresh kernels with the current backend; they share two module-scoped runs to
keep the time down.
"""

import csv
import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import jsonschema
import keras
import nbformat
import numpy as np
import pytest
from keras import ops

from keras_decoder.grading import (
    Mistake,
    Outcome,
    Output,
    evaluate,
    exercise_sets,
    get_exercise_set,
    load_exercise,
)
from keras_decoder.grading import cli, grader, notebooks, runner
from keras_decoder.grading._harness import to_array
from keras_decoder.grading.checker import run_cases
from keras_decoder.grading.exercises import ex03_masks
from keras_decoder.grading.spec import compare, validate_set

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "exercises" / "source" / "03_masks.ipynb"
LEARNER = ROOT / "exercises" / "03_masks.ipynb"
BACKEND = keras.backend.backend()
SET = get_exercise_set("03_masks")
ISSUE_SIGNATURES = {
    "padding_mask": "padding_mask(token_ids, pad_id=0)",
    "causal_mask": "causal_mask(query_len, key_len)",
    "cross_attention_mask": "cross_attention_mask(decoder_padding_mask, encoder_padding_mask)",
    "shift_right": "shift_right(token_ids, start_id)",
    "scaled_dot_product_attention": "scaled_dot_product_attention(query, key, value, mask=None)",
}


def _load_fixtures():
    spec = importlib.util.spec_from_file_location(
        "grading_fixtures_adversarial", ROOT / "tests" / "grading_fixtures" / "adversarial.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIXTURES = _load_fixtures()


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


ALL_SETS = list(exercise_sets().values())
ALL_QUESTIONS = [(s, q) for s in ALL_SETS for q in s.questions]


def _solutions(exercise_set=SET):
    """The solutions of a set's source notebook, defined in this process.

    Runs the notebook's code cells in order, except the graded check cells.
    """
    nb = nbformat.read(ROOT / exercise_set.source, as_version=4)
    namespace = {}
    with redirect_stdout(io.StringIO()):
        for cell in nb.cells:
            if cell.cell_type == "code" and not cell.metadata.get("nbgrader", {}).get("grade"):
                exec(cell.source, namespace)  # noqa: S102  (our own notebook)
    return {q.name: namespace[q.name] for q in exercise_set.questions}


# ---------------------------------------------------------------------------
# The exercise format and the registry.
# ---------------------------------------------------------------------------
def test_registry_has_valid_sets_with_unique_function_names():
    sets = exercise_sets()
    assert "03_masks" in sets
    names = [q.name for s in sets.values() for q in s.questions]
    assert len(names) == len(set(names))
    for exercise_set in sets.values():
        validate_set(exercise_set)
        assert (ROOT / exercise_set.source).exists()
        assert (ROOT / exercise_set.notebook).exists()


def test_first_set_asks_for_the_issue_functions():
    assert {q.name: q.signature for q in SET.questions} == ISSUE_SIGNATURES
    assert SET.max_score == 10
    for q in SET.questions:
        assert len(q.mistakes) >= 3 and len(q.hints) >= 2


def test_validate_set_rejects_a_thin_catalogue():
    thin = SET.questions[0].__class__(**{**SET.questions[0].__dict__, "mistakes": SET.questions[0].mistakes[:2]})
    with pytest.raises(ValueError, match="at least 3"):
        validate_set(SET.__class__("x", "x", (thin,)))


@pytest.mark.parametrize("exercise_set,question", ALL_QUESTIONS, ids=[q.name for _, q in ALL_QUESTIONS])
def test_reference_is_correct_on_fresh_inputs(exercise_set, question):
    for seed in range(25):
        cases = question.make_cases(np.random.default_rng(seed))
        verdict = evaluate(question, cases, run_cases(question.reference, cases))
        assert verdict.status == "correct", verdict.feedback
        assert verdict.points == question.points


def test_inputs_are_fresh_each_draw():
    q = SET.question("scaled_dot_product_attention")
    a = q.make_cases(np.random.default_rng())
    b = q.make_cases(np.random.default_rng())
    assert not np.array_equal(a[0].args[0], b[0].args[0])


def test_attention_mistake_core_with_defaults_is_the_reference():
    q = SET.question("scaled_dot_product_attention")
    for case in q.make_cases(np.random.default_rng(0)):
        np.testing.assert_allclose(case.call(ex03_masks._attention), case.call(q.reference), atol=1e-12)


def test_reference_attention_fully_masked_rows_are_zero_not_nan():
    q = np.ones((1, 2, 1, 4), np.float32)
    mask = np.array([[[True, False], [False, False]]])
    out = ex03_masks.scaled_dot_product_attention(q, q, q, mask)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[0, 1], 0.0)


# Mistakes recognised by a predicate: a concrete mistaken answer to try.
_RECOGNIZED = {
    ("causal_mask", "additive_mask"): [
        lambda query_len, key_len: np.where(ex03_masks.causal_mask(query_len, key_len), 0.0, -np.inf),
        lambda query_len, key_len: np.where(ex03_masks.causal_mask(query_len, key_len), 0.0, -1e9).astype(np.float32),
    ],
    ("cross_attention_mask", "additive_mask"): [
        lambda d, e: np.where(ex03_masks.cross_attention_mask(d, e), 0.0, -1e9),
    ],
}
_MISTAKES = [(q, m) for _, q in ALL_QUESTIONS for m in q.mistakes]


@pytest.mark.parametrize("question,mistake", _MISTAKES, ids=[f"{q.name}-{m.name}" for q, m in _MISTAKES])
def test_every_catalogued_mistake_is_diagnosed(question, mistake):
    implementations = mistake.variants or _RECOGNIZED[(question.name, mistake.name)]
    for implementation in implementations:
        for seed in range(15):
            cases = question.make_cases(np.random.default_rng(1000 + seed))
            verdict = evaluate(question, cases, run_cases(implementation, cases))
            assert verdict.status in ("incorrect", "error"), verdict.feedback
            assert verdict.points == 0 < question.points
            assert verdict.diagnosis == mistake.name, verdict.feedback
            assert verdict.feedback.startswith(f"[{mistake.name}]")


def _keras_sdpa(fill, scale=True):
    def attention(query, key, value, mask=None):
        q, k, v = (ops.convert_to_tensor(t, "float32") for t in (query, key, value))
        scores = ops.einsum("bqhd,bkhd->bhqk", q, k)
        if scale:
            scores = scores / float(np.sqrt(q.shape[-1]))
        if mask is not None:
            m = ops.convert_to_tensor(mask, "bool")
            m = ops.expand_dims(m, 1) if len(m.shape) == 3 else m
            scores = ops.where(m, scores, fill)
            weights = ops.softmax(scores, axis=-1)
            if fill != float("-inf"):
                weights = weights * ops.cast(ops.any(m, axis=-1, keepdims=True), "float32")
        else:
            weights = ops.softmax(scores, axis=-1)
        return ops.einsum("bhqk,bkhd->bqhd", weights, v)

    return attention


_KERAS_MISTAKES = {
    ("padding_mask", "inverted_mask"): lambda token_ids, pad_id=0: ops.equal(ops.convert_to_tensor(token_ids), pad_id),
    ("causal_mask", "top_left_alignment"): lambda query_len, key_len: ops.cast(
        ops.tril(ops.ones((query_len, key_len))), "bool"
    ),
    ("cross_attention_mask", "masks_queries_too"): lambda d, e: ops.logical_and(
        ops.expand_dims(ops.convert_to_tensor(d), 2), ops.expand_dims(ops.convert_to_tensor(e), 1)
    ),
    ("shift_right", "roll_wraps_around"): lambda token_ids, start_id: ops.roll(ops.convert_to_tensor(token_ids), 1, axis=1),
    ("scaled_dot_product_attention", "nan_on_fully_masked_row"): _keras_sdpa(float("-inf")),
    ("scaled_dot_product_attention", "missing_scale"): _keras_sdpa(-1e30, scale=False),
}


@pytest.mark.parametrize("key", list(_KERAS_MISTAKES), ids=lambda k: f"{k[0]}-{k[1]}")
def test_mistakes_written_with_keras_ops_are_diagnosed_on_this_backend(key):
    name, mistake = key
    ex = load_exercise("03_masks", seed=7)
    verdict = ex.result(_KERAS_MISTAKES[key], name)
    assert verdict.diagnosis == mistake, verdict.feedback


def test_compare_explains_shape_dtype_nan_and_values():
    want = np.array([[True, False]])
    assert "expected shape (1, 2)" in compare(want, np.ones((2, 1), bool), Output("bool"))
    assert "dtype float32" in compare(want, np.ones((1, 2), np.float32), Output("bool"))
    assert "1 of 2 values differ" in compare(want, np.array([[True, True]]), Output("bool"))
    assert "NaN" in compare(np.zeros(3), np.array([0.0, np.nan, 0.0]), Output("float"))
    assert compare(np.zeros(3), np.full(3, 1e-4), Output("float")) is None


def test_mistake_needs_impl_or_recognize():
    with pytest.raises(ValueError):
        Mistake("x", "y")


def test_an_answer_that_always_raises_is_not_diagnosed_as_a_mistake_that_raises():
    q = SET.question("cross_attention_mask")
    cases = q.make_cases(np.random.default_rng(0))
    always = Mistake("always_raises", "x", impl=lambda d, e: 1 / 0)
    q2 = q.__class__(**{**q.__dict__, "mistakes": (always,) + q.mistakes})
    verdict = evaluate(q2, cases, [Outcome("error", error="MemoryError")] * len(cases))
    assert verdict.status == "error" and verdict.diagnosis is None, verdict.feedback


def test_evaluate_partial_not_implemented_is_an_error():
    q = SET.question("causal_mask")
    cases = q.make_cases(np.random.default_rng(0))
    outcomes = [Outcome("ok", q.reference(*c.args)) for c in cases[:-1]] + [Outcome("not_implemented")]
    verdict = evaluate(q, cases, outcomes)
    assert verdict.status == "error" and "NotImplementedError" in verdict.feedback


# ---------------------------------------------------------------------------
# ex.check and friends, in this process.
# ---------------------------------------------------------------------------
def _printed(fn, *args, **kwargs):
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        fn(*args, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("exercise_set,question", ALL_QUESTIONS, ids=[q.name for _, q in ALL_QUESTIONS])
def test_solutions_of_the_source_notebook_are_correct_on_this_backend(exercise_set, question):
    solution = _solutions(exercise_set)[question.name]
    ex = load_exercise(exercise_set.id)
    verdict = ex.result(solution)
    assert verdict.status == "correct", verdict.feedback
    assert _printed(ex.check, solution).startswith("Correct")


def test_check_reports_incorrect_with_diagnosis_and_not_attempted():
    ex = load_exercise("03_masks")

    def causal_mask(query_len, key_len):
        return np.tril(np.ones((query_len, key_len), bool))

    text = _printed(ex.check, causal_mask)
    assert text.startswith("Incorrect") and "[top_left_alignment]" in text and "expected:" in text

    def shift_right(token_ids, start_id):
        # YOUR CODE HERE
        raise NotImplementedError()

    assert _printed(ex.check, shift_right).startswith("Not attempted")


def test_check_never_raises():
    ex = load_exercise("03_masks")

    def padding_mask(token_ids, pad_id=0):
        raise ValueError("boom")

    def causal_mask(query_len, key_len):
        raise SystemExit(3)

    def shift_right(token_ids, start_id):
        return None

    def cross_attention_mask(d, e):
        return (np.ones(1), np.ones(2))

    def scaled_dot_product_attention(query, key, value, mask=None):
        return np.array([object()])

    assert "raised ValueError: boom" in _printed(ex.check, padding_mask)
    assert "raised SystemExit" in _printed(ex.check, causal_mask)
    assert "returned None" in _printed(ex.check, shift_right)
    assert "tuple of 2 values" in _printed(ex.check, cross_attention_mask)
    assert "not a numeric array" in _printed(ex.check, scaled_dot_product_attention)
    assert "No question named 'print'" in _printed(ex.check, print)
    assert "Questions:" in _printed(ex.hint, "nope")
    assert "Questions:" in _printed(ex.solution, "nope")


def test_check_raises_only_under_nbgrader(monkeypatch):
    ex = load_exercise("03_masks")
    wrong = lambda token_ids, pad_id=0: np.asarray(token_ids) == pad_id  # noqa: E731
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    with pytest.raises(AssertionError):
        _printed(ex.check, wrong, "padding_mask")
    _printed(ex.check, ex03_masks.padding_mask)  # correct: no exception


def test_hints_and_solution():
    ex = load_exercise("03_masks")
    assert _printed(ex.hint, "causal_mask").startswith("Hint 1/3")
    assert "last hint" in _printed(ex.hint, "causal_mask", 9)
    text = _printed(ex.solution, "causal_mask")
    assert "def causal_mask(query_len, key_len):" in text
    assert "10 points" in repr(ex)


def test_check_all_summarises_a_namespace():
    ex = load_exercise("03_masks")
    namespace = {"padding_mask": ex03_masks.padding_mask, "causal_mask": np.tril}
    text = _printed(ex.check_all, namespace)
    assert "padding_mask" in text and "1/1" in text and "total" in text and "1/10" in text


def test_to_array_accepts_tensors_lists_and_scalars():
    assert to_array(ops.ones((2, 3), dtype="bool")).dtype == np.bool_
    assert to_array(ops.convert_to_tensor(np.arange(3, dtype="int32"))).tolist() == [0, 1, 2]
    assert to_array([[True, False]]).shape == (1, 2)
    with pytest.raises(TypeError):
        to_array("abc")
    with pytest.raises(TypeError):
        to_array(np.zeros(2_000_000))


# ---------------------------------------------------------------------------
# Notebooks: the generator, the metadata, reading submissions.
# ---------------------------------------------------------------------------
def test_committed_learner_notebook_is_what_the_generator_makes():
    expected = notebooks.notebook_text(notebooks.make_learner_notebook(nbformat.read(SOURCE, as_version=4)))
    assert LEARNER.read_text(encoding="utf-8") == expected, "run `make exercises`"
    assert all(up_to_date for _, _, up_to_date in notebooks.build_exercises(ROOT, check=True))


def test_generator_is_deterministic_and_json_equal():
    source = nbformat.read(SOURCE, as_version=4)
    one = notebooks.notebook_text(notebooks.make_learner_notebook(source))
    two = notebooks.notebook_text(notebooks.make_learner_notebook(source))
    assert one == two
    assert json.loads(one) == json.loads(LEARNER.read_text(encoding="utf-8"))


@pytest.mark.parametrize("exercise_set", ALL_SETS, ids=lambda s: s.id)
def test_learner_notebook_has_stubs_and_no_solutions(exercise_set):
    source = nbformat.read(ROOT / exercise_set.source, as_version=4)
    learner = nbformat.read(ROOT / exercise_set.notebook, as_version=4)
    assert len(source.cells) == len(learner.cells)
    text = (ROOT / exercise_set.notebook).read_text()
    assert notebooks.BEGIN_SOLUTION not in text and notebooks.END_SOLUTION not in text
    for src, out in zip(source.cells, learner.cells):
        assert src.id == out.id
        if out.cell_type == "code":
            assert out.outputs == [] and out.execution_count is None
        if src.metadata.get("nbgrader", {}).get("solution"):
            assert "    # YOUR CODE HERE\n    raise NotImplementedError()" in out.source
            inside = src.source.split(notebooks.BEGIN_SOLUTION)[1].split(notebooks.END_SOLUTION)[0]
            for line in inside.strip().splitlines():
                if line.strip() and not line.strip().startswith("#"):
                    assert line not in out.source
    assert learner.metadata["keras_decoder"] == {"exercise": exercise_set.id, "role": "learner"}


@pytest.mark.parametrize("exercise_set", ALL_SETS, ids=lambda s: s.id)
def test_nbgrader_metadata_matches_the_registry(exercise_set):
    nb = nbformat.read(ROOT / exercise_set.source, as_version=4)
    assert nb.metadata["keras_decoder"]["exercise"] == exercise_set.id
    ids, points, solutions = set(), {}, set()
    for cell in nb.cells:
        meta = cell.metadata["nbgrader"]
        assert {"grade", "grade_id", "locked", "schema_version", "solution", "task"} <= set(meta)
        assert meta["schema_version"] == 3 and meta["grade_id"] not in ids
        ids.add(meta["grade_id"])
        if meta["grade"]:
            assert meta["locked"] and cell.cell_type == "code"
            points[meta["grade_id"].removeprefix("check_")] = meta["points"]
            assert cell.source.startswith("ex.check(")
        if meta["solution"]:
            solutions.add(meta["grade_id"])
            assert not meta["locked"]
    assert points == {q.name: q.points for q in exercise_set.questions}
    assert solutions == {q.name for q in exercise_set.questions}


def test_strip_solutions():
    code = "def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n"
    assert notebooks.strip_solutions(code) == "def f(x):\n    # YOUR CODE HERE\n    raise NotImplementedError()\n"
    assert notebooks.strip_solutions("a\n### BEGIN SOLUTION\nb\n### END SOLUTION", "markdown") == "a\nYOUR ANSWER HERE"
    for broken in ("### BEGIN SOLUTION\nx", "x\n### END SOLUTION", "### BEGIN SOLUTION\n### BEGIN SOLUTION\n"):
        with pytest.raises(notebooks.NotebookError):
            notebooks.strip_solutions(broken)


def test_a_solution_cell_without_a_region_is_an_authoring_error():
    learner = nbformat.read(LEARNER, as_version=4)
    with pytest.raises(notebooks.NotebookError, match="no '### BEGIN SOLUTION' region"):
        notebooks.make_learner_notebook(learner)


def test_code_statements_split_cells():
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# title"),
        nbformat.v4.new_code_cell("import numpy as np\n@decorate\ndef f(x):\n    return x\na = 1; b = 2\n%time c = 3"),
        nbformat.v4.new_code_cell("def broken(:\n    pass"),
    ]
    statements = notebooks.code_statements(nb)
    assert [(s.cell, s.line) for s in statements] == [(2, 1), (2, 2), (2, 5), (2, 6), (3, 1)]
    assert statements[1].defines == ("f",) and statements[1].source.startswith("@decorate")
    assert statements[2].defines == ("a", "b")
    assert "run_line_magic" in statements[3].source
    assert statements[4].source == "def broken(:\n    pass"
    assert {"f", "a", "b", "np"} <= notebooks.defined_functions(nb)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"not json {", "not valid JSON"),
        (b"[1, 2]", "not a Jupyter notebook"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b'{"cells": "x", "metadata": {}, "nbformat": 4, "nbformat_minor": 5}', "nbformat 4"),
    ],
)
def test_read_submission_rejects_what_is_not_a_notebook(data, reason):
    with pytest.raises(notebooks.NotebookError, match=reason):
        notebooks.read_submission(data)


def test_exercise_set_is_found_from_metadata_or_function_names():
    learner = nbformat.read(LEARNER, as_version=4)
    assert grader._choose_set(learner, None).id == "03_masks"
    bare = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("def causal_mask(a, b):\n    pass")])
    assert grader._choose_set(bare, None).id == "03_masks"
    with pytest.raises(LookupError, match="pass --exercise"):
        grader._choose_set(nbformat.v4.new_notebook(), None)
    assert grader._choose_set(nbformat.v4.new_notebook(), "03_masks").id == "03_masks"


# ---------------------------------------------------------------------------
# The kernel-side guard, tested in a plain subprocess (no kernel needed).
# ---------------------------------------------------------------------------
GUARD_SCRIPT = r'''
import builtins, importlib.util, json, os, sys, tempfile, types
spec = importlib.util.spec_from_file_location("harness", sys.argv[1])
h = importlib.util.module_from_spec(spec); spec.loader.exec_module(h)
secret_dir, allowed_dir = tempfile.mkdtemp(), tempfile.mkdtemp()
secret = os.path.join(secret_dir, "secret.txt"); open(secret, "w").write("s")
ok = os.path.join(allowed_dir, "ok.txt"); open(ok, "w").write("ok")
os.symlink(secret, os.path.join(allowed_dir, "link"))
import ctypes, mmap, socket, subprocess, gc, resource, pathlib
h._stub_modules("blockedpkg", sys, types)
log = []
allow = h._allowed_reads(sys, os, os.getpid()) + [allowed_dir]
sys.addaudithook(h._make_guard(allow, [secret_dir], "blockedpkg", log))
class S(str):
    pass
def second_hook(event, args):
    second_hook.called = True
second_hook.called = False
attempts = {
    "read_secret": lambda: open(secret).read(),
    "read_secret_bytes": lambda: open(secret.encode()).read(),
    "read_secret_pathlib": lambda: pathlib.Path(secret).read_text(),
    "read_secret_str_subclass": lambda: open(S(secret)).read(),
    "read_via_symlink": lambda: open(os.path.join(allowed_dir, "link")).read(),
    "read_via_proc_root": lambda: open("/proc/self/root" + secret).read(),
    "read_via_dotdot": lambda: open(allowed_dir + "/../" + os.path.basename(secret_dir) + "/secret.txt").read(),
    "os_open_secret": lambda: os.open(secret, os.O_RDONLY),
    "list_secret_dir": lambda: os.listdir(secret_dir),
    "read_parent_memory": lambda: open(f"/proc/{os.getppid()}/environ").read(),
    "write_allowed_dir": lambda: open(os.path.join(allowed_dir, "new.txt"), "w"),
    "os_open_write": lambda: os.open(os.path.join(allowed_dir, "x"), os.O_WRONLY | os.O_CREAT),
    "remove": lambda: os.remove(ok),
    "rename": lambda: os.rename(ok, ok + ".2"),
    "mkdir": lambda: os.mkdir(os.path.join(allowed_dir, "d")),
    "symlink": lambda: os.symlink(secret, os.path.join(allowed_dir, "l2")),
    "subprocess": lambda: subprocess.run(["true"]),
    "os_system": lambda: os.system("true"),
    "fork": lambda: os.fork(),
    "kill_parent": lambda: os.kill(os.getppid(), 0),
    "ctypes": lambda: ctypes.CDLL(None),
    "ctypes_pythonapi": lambda: ctypes.pythonapi.Py_GetVersion,
    "socket": lambda: socket.socket(),
    "mmap": lambda: mmap.mmap(-1, 4096),
    "gc_objects": lambda: gc.get_objects(),
    "code_replace": lambda: (lambda: 0).__code__.replace(co_name="x"),
    # silently refused: the second hook never runs (else 1 / 0 raises)
    "addaudithook_refused": lambda: (sys.addaudithook(second_hook), open(ok).read(), second_hook.called and 1 / 0),
    "setrlimit": lambda: resource.setrlimit(resource.RLIMIT_DATA, (-1, -1)),
    "import_blocked": lambda: __import__("blockedpkg.secret"),
    # allowed
    "read_allowed": lambda: open(ok).read(),
    "read_stdlib": lambda: open(os.__file__).read(10),
    "import_new_stdlib": lambda: __import__("colorsys"),
    "stub_import": lambda: __import__("blockedpkg.grading", fromlist=["load_exercise"]).load_exercise("x").check(1),
    "write_dev_null": lambda: open("/dev/null", "w").write("x"),
}
results = {}
for name, attempt in attempts.items():
    try:
        attempt()
        results[name] = "allowed"
    except BaseException as exc:
        results[name] = type(exc).__name__
# Replacing builtins or os functions does not weaken the guard.
saved = builtins.len, builtins.type, os.lstat, os.readlink
builtins.len = lambda x: 0
builtins.type = lambda x: str
os.lstat = os.readlink = lambda *a: None
try:
    open(secret).read()
    outcome = "allowed"
except BaseException as exc:
    outcome = exc.__class__.__name__
builtins.len, builtins.type, os.lstat, os.readlink = saved
results["after_patching"] = outcome
sys.stdout.write(json.dumps({"results": results, "log": len(log)}))
'''

GUARD_ALLOWED = {
    "read_allowed", "read_stdlib", "import_new_stdlib", "stub_import", "write_dev_null", "addaudithook_refused",
}


def test_guard_blocks_escapes_and_allows_libraries(tmp_path):
    script = tmp_path / "guard.py"
    script.write_text(GUARD_SCRIPT)
    harness = ROOT / "keras_decoder" / "grading" / "_harness.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(harness)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    results = report["results"]
    for name, outcome in results.items():
        if name in GUARD_ALLOWED:
            assert outcome == "allowed", (name, outcome)
        else:
            assert outcome in ("PermissionError", "ModuleNotFoundError"), (name, outcome)
    assert report["log"] >= len(results) - len(GUARD_ALLOWED)


# ---------------------------------------------------------------------------
# Results coming back from a kernel are decoded defensively.
# ---------------------------------------------------------------------------
def _npy(array, allow_pickle=False):
    import base64

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return base64.b64encode(buffer.getvalue()).decode()


def _out(payload):
    return [{"output_type": "display_data", "data": {runner.MIME: payload}}]


def test_parse_payload_accepts_good_results_only():
    good = {"nonce": "n", "question": "q", "defined": True, "cases": [{"status": "ok", "npy": _npy(np.eye(2))}]}
    kind, outcomes = runner.parse_payload(_out(good), "n", "q", 1)
    assert kind == "outcomes" and np.array_equal(outcomes[0].value, np.eye(2))
    assert runner.parse_payload(_out(good), "other-nonce", "q", 1)[0] == "unreadable"
    assert runner.parse_payload(_out(good) * 2, "n", "q", 1) == ("unreadable", "more than one result came back")
    assert runner.parse_payload(_out({**good, "defined": False}), "n", "q", 1)[0] == "undefined"
    bad_cases = [
        [{"status": "ok", "npy": _npy(np.array([object()]), allow_pickle=True)}],  # a pickle
        [{"status": "ok", "npy": "%%%"}],
        [{"status": "ok"}],
        [{"status": "correct"}],
        [{"status": "ok", "npy": _npy(np.array(["a"]))}],
        [{"status": "ok", "npy": _npy(np.eye(1))}] * 2,  # more cases than asked
        "not a list",
    ]
    for cases in bad_cases:
        assert runner.parse_payload(_out({**good, "cases": cases}), "n", "q", 1)[0] == "unreadable", cases
    timed_out = {**good, "cases": [{"status": "timeout"}]}
    assert runner.parse_payload(_out(timed_out), "n", "q", 3)[0] == "timeout"


# ---------------------------------------------------------------------------
# Reports and the command line (no kernels).
# ---------------------------------------------------------------------------
def _fake_result(**overrides):
    result = {
        "notebook": "a.ipynb", "exercise": "03_masks", "backend": BACKEND, "score": 1, "max_score": 10,
        "status": "graded", "message": None, "sha256": "0" * 64, "duration_s": 1.5,
        "questions": [
            {"name": q.name, "points": 0, "max_points": q.points, "status": "incorrect", "feedback": "x",
             "diagnosis": None}
            for q in SET.questions
        ],
    }
    result.update(overrides)
    return result


def test_json_and_csv_reports(tmp_path):
    results = [_fake_result(), _fake_result(notebook="b.ipynb", exercise=None, max_score=0, status="error",
                                            message="not a valid notebook", questions=[])]
    grader.write_json(results, tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(loaded, grader.RESULT_SCHEMA)
    grader.write_csv(results, tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert list(rows[0]) == ["notebook", "exercise", "backend", "status", "score", "max_score",
                             *ISSUE_SIGNATURES, "message"]
    assert rows[1]["status"] == "error" and rows[1]["causal_mask"] == ""
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([_fake_result(status="excellent")], grader.RESULT_SCHEMA)
    assert "a.ipynb" in grader.format_table(results[0])


def test_cli_exercises_list(capsys):
    assert cli.main(["exercises", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    entry = next(e for e in listing if e["id"] == "03_masks")
    assert entry["notebook"] == "exercises/03_masks.ipynb" and entry["max_score"] == 10
    assert [(q["name"], q["points"]) for q in entry["questions"]] == [(q.name, q.points) for q in SET.questions]
    assert cli.main(["exercises", "list"]) == 0
    assert "causal_mask(query_len, key_len)" in capsys.readouterr().out


def test_cli_exercises_build_check(capsys):
    assert cli.main(["exercises", "build", "--check", "--root", str(ROOT)]) == 0
    assert "up to date: exercises/03_masks.ipynb" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ["grade"],
        ["grade", "no/such/file.ipynb"],
        ["grade", "{learner}", "--exercise", "99_nothing"],
        ["grade", "{learner}", "--timeout", "-1"],
        ["grade", "{learner}", "--backend", "numpy"],
        ["grade", "{empty_dir}"],
        ["grade", "{learner}", "--json", "/no/such/dir/out.json"],
        ["nonsense"],
    ],
)
def test_cli_usage_errors_exit_2(args, tmp_path):
    (tmp_path / "empty").mkdir()
    args = [a.format(learner=LEARNER, empty_dir=tmp_path / "empty") for a in args]
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2


def test_default_deny_covers_package_repo_and_submissions(tmp_path):
    deny = grader.default_deny([tmp_path / "a.ipynb"])
    assert str(ROOT / "keras_decoder") in deny and str(ROOT) in deny and str(tmp_path) in deny


# ---------------------------------------------------------------------------
# End to end: real kernels, the current backend.
# ---------------------------------------------------------------------------
BATCH = ["cheats", "exits_and_escapes"]
PROTECTED = [
    ROOT / "keras_decoder" / "grading" / "exercises" / "ex03_masks.py",
    SOURCE,
    LEARNER,
]


def _grade_runaway(folder, into):
    paths = FIXTURES.write_fixtures(folder, ["runaway"])
    into["runaway"] = grader.grade_paths([paths["runaway"]], backend=BACKEND, timeout=6, memory_limit_mb=512)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Grade the solution, the learner notebook and the adversarial set with the CLI, once.

    The runaway submission (short timeout, small memory limit) is graded at the
    same time, through the Python API, in a thread.
    """
    import threading

    runaway = {}
    thread = threading.Thread(target=_grade_runaway, args=(tmp_path_factory.mktemp("runaway"), runaway))
    folder = tmp_path_factory.mktemp("submissions")
    paths = FIXTURES.write_fixtures(folder, BATCH)
    shutil.copy(SOURCE, folder / "solution.ipynb")
    shutil.copy(LEARNER, folder / "learner.ipynb")
    watched = sorted(folder.glob("*.ipynb")) + PROTECTED
    before = {p: _sha256(p) for p in watched}
    out = tmp_path_factory.mktemp("reports")
    scratch, make = [], grader.tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        scratch.append(make(*args, **kwargs))
        return scratch[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grader.tempfile, "mkdtemp", recording_mkdtemp)
        thread.start()
        code = cli.main(
            ["grade", str(folder), "--backend", BACKEND, "--jobs", "2", "--timeout", "60",
             "--json", str(out / "grades.json"), "--csv", str(out / "grades.csv"), "--quiet"]
        )
        thread.join()
    results = json.loads((out / "grades.json").read_text())
    rows = list(csv.DictReader(open(out / "grades.csv")))
    after = {p: _sha256(p) for p in watched}
    by_name = {Path(r["notebook"]).stem: r for r in results}
    return {"code": code, "results": results, "by_name": by_name, "rows": rows, "before": before,
            "after": after, "paths": paths, "scratch": scratch, "runaway": runaway.get("runaway")}


def test_grade_exits_zero_and_reports_follow_the_schema(batch):
    assert batch["code"] == 0
    jsonschema.validate(batch["results"], grader.RESULT_SCHEMA)
    assert len(batch["results"]) == len(BATCH) + 4
    assert {r["backend"] for r in batch["results"]} == {BACKEND}
    assert len(batch["rows"]) == len(batch["results"])
    for row, result in zip(batch["rows"], batch["results"]):
        assert row["notebook"] == result["notebook"] and int(row["score"]) == result["score"]
        for q in result["questions"]:
            assert int(row[q["name"]]) == q["points"]


def test_solution_scores_full_marks(batch):
    result = batch["by_name"]["solution"]
    assert (result["status"], result["score"], result["max_score"]) == ("graded", 10, 10), result
    assert all(q["status"] == "correct" for q in result["questions"])


def test_learner_notebook_scores_zero_not_attempted(batch):
    result = batch["by_name"]["learner"]
    assert (result["status"], result["score"]) == ("graded", 0), result
    assert [q["status"] for q in result["questions"]] == ["not_attempted"] * 5


def test_invalid_and_empty_notebooks_get_a_clear_error(batch):
    invalid, empty = batch["by_name"]["invalid"], batch["by_name"]["empty"]
    assert invalid["status"] == "error" and "not valid JSON" in invalid["message"]
    assert empty["status"] == "error" and "--exercise" in empty["message"]


@pytest.mark.parametrize("name", BATCH)
def test_adversarial_submission_scores_no_more_than_its_honest_work(batch, name):
    _, _, expected = FIXTURES.FIXTURES[name]
    result = batch["by_name"][name]
    assert result["status"] == expected["status"], result
    assert result["score"] == expected["score"], result
    for q in result["questions"]:
        allowed = expected["questions"][q["name"]]
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        assert q["status"] in allowed, (q, result["message"])
    if "blocked_at_least" in expected:
        assert "the grader blocked" in result["message"]
        blocked = int(result["message"].split("the grader blocked ")[1].split()[0])
        assert blocked >= expected["blocked_at_least"], result["message"]


def test_no_file_was_modified(batch):
    assert batch["before"] == batch["after"]


def test_runaway_submission_is_stopped_and_its_honest_part_graded(batch):
    results = batch["runaway"]
    result = results[0]
    jsonschema.validate(results, grader.RESULT_SCHEMA)
    _, _, expected = FIXTURES.FIXTURES["runaway"]
    assert (result["status"], result["score"]) == (expected["status"], expected["score"]), result
    assert {q["name"]: q["status"] for q in result["questions"]} == expected["questions"], result
    cross = next(q for q in result["questions"] if q["name"] == "cross_attention_mask")
    assert "MemoryError" in cross["feedback"]


def test_empty_notebook_with_exercise_is_graded_without_a_kernel(tmp_path):
    path = tmp_path / "empty.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), path)
    result = grader.grade_paths([path], exercise="03_masks", backend=BACKEND)[0]
    assert (result["status"], result["score"], result["message"]) == ("graded", 0, "the notebook has no code")
    assert {q["status"] for q in result["questions"]} == {"not_attempted"}


def test_no_scratch_folders_are_left_behind(batch):
    assert batch["scratch"], "grade_paths made no scratch folder?"
    assert not [p for p in batch["scratch"] if Path(p).exists()]


@pytest.mark.parametrize(
    "answer",
    [np.float32(2.5), np.array(3, dtype=np.int32), 7, np.eye(3)[:, ::2], np.zeros((2, 0))],
    ids=["numpy-scalar", "0-d-array", "python-int", "non-contiguous", "empty"],
)
def test_harness_sends_results_back_with_their_shape(answer):
    # A scalar answer once came back as shape (1,) (np.ascontiguousarray) and
    # was graded wrong by `keras-decoder grade` while `ex.check` said correct.
    import base64
    import time

    from keras_decoder.grading import _harness

    sent = []
    harness = _harness._Harness(
        cases={"q": [((), {})]}, namespace={"q": lambda: answer},
        publish=sent.append, mime=runner.MIME, nonce="n", np=np, io=io, base64=base64,
        time=time, blocked=[], convert=None,
    )
    harness.call("q")
    kind, outcomes = runner.parse_payload(_out(sent[0][runner.MIME]), "n", "q", 1)
    assert kind == "outcomes"
    expected = np.asarray(answer)
    assert outcomes[0].value.shape == expected.shape
    np.testing.assert_array_equal(outcomes[0].value, expected)
