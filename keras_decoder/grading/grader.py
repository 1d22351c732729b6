"""Grade submitted notebooks: ``keras-decoder grade`` and its Python API.

Each notebook is graded by its own *worker* process (``grading/worker.py``),
which starts a fresh kernel for the submission (:mod:`.runner`). So whatever a
submission does to its kernel, or to the worker, the batch goes on: the main
process records an ``error`` for that notebook and grades the next one. A
worker that outlives a generous hard limit is killed, together with its
kernels.

The worker:

1. reads the submission's bytes (the file is never written; the kernel never
   sees its path), checks it is a notebook, and finds its exercise set
   (``--exercise``, else the notebook's metadata, else the function names it
   defines);
2. draws fresh random inputs for every question (a new seed from the OS);
3. runs the submission (:func:`.runner.run_submission`);
4. only after the kernel has been shut down, computes the reference outputs
   and judges every question (:func:`.spec.evaluate`).

The result of one notebook is a dict that follows :data:`RESULT_SCHEMA`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import notebooks, registry, runner
from .spec import STATUSES, Verdict, evaluate, not_defined

__all__ = [
    "BACKENDS",
    "NOTEBOOK_STATUSES",
    "RESULT_SCHEMA",
    "DEFAULT_TIMEOUT",
    "DEFAULT_MEMORY_MB",
    "find_notebooks",
    "default_deny",
    "grade_one",
    "grade_paths",
    "write_json",
    "write_csv",
    "format_table",
]

BACKENDS = ("tensorflow", "jax", "torch")
NOTEBOOK_STATUSES = ("graded", "timeout", "error")
DEFAULT_TIMEOUT = 60.0
DEFAULT_MEMORY_MB = 2048
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # keras_decoder/

#: JSON Schema of ``keras-decoder grade --json`` (a list, one entry per notebook).
RESULT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "keras-decoder grade --json",
    "type": "array",
    "items": {
        "type": "object",
        "required": [
            "notebook", "exercise", "backend", "score", "max_score", "status", "message", "questions",
        ],
        "additionalProperties": False,
        "properties": {
            "notebook": {"type": "string", "description": "the path given on the command line"},
            "exercise": {"type": ["string", "null"], "description": "exercise set id, null if unknown"},
            "backend": {"enum": list(BACKENDS)},
            "score": {"type": "integer", "minimum": 0},
            "max_score": {"type": "integer", "minimum": 0},
            "status": {"enum": list(NOTEBOOK_STATUSES)},
            "message": {"type": ["string", "null"], "description": "what went wrong, null if nothing"},
            "sha256": {"type": ["string", "null"], "description": "of the graded file's bytes"},
            "duration_s": {"type": "number", "minimum": 0},
            "questions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "points", "max_points", "status", "feedback", "diagnosis"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "points": {"type": "integer", "minimum": 0},
                        "max_points": {"type": "integer", "minimum": 0},
                        "status": {"enum": list(STATUSES)},
                        "feedback": {"type": "string"},
                        "diagnosis": {"type": ["string", "null"]},
                    },
                },
            },
        },
    },
}


# ---------------------------------------------------------------------------
# Finding notebooks and protecting files.
# ---------------------------------------------------------------------------
def find_notebooks(paths):
    """Expand files and folders into a sorted list of ``.ipynb`` paths (checkpoints skipped).

    Raises ``FileNotFoundError`` for a path that does not exist.
    """
    found = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts and p.is_file()
            )
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"No such file or folder: {raw}")
    unique, seen = [], set()
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def default_deny(paths=()):
    """Paths a grading kernel may never read.

    The ``keras_decoder`` package (with the reference solutions), the
    repository it sits in (source notebooks with solutions, tests), every
    submission's folder (other learners' work) and the current folder.
    """
    deny = {PACKAGE_DIR}
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").exists() or (root / "exercises").is_dir():
        deny.add(root)
    for raw in paths:
        path = Path(raw).resolve()
        deny.add(path if path.is_dir() else path.parent)
    deny.add(Path.cwd().resolve())
    # Never hide Python itself (a submission folder or the current folder could be
    # the installation, or inside it); the repository may contain the virtualenv,
    # which stays readable because a longer allowed prefix wins.
    python = [Path(p).resolve() for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}]
    keep = {PACKAGE_DIR, root}
    deny = {p for p in deny if p in keep or not any(p == q or q in p.parents for q in python)}
    return sorted(str(p) for p in deny if str(p) != "/")


# ---------------------------------------------------------------------------
# One notebook (runs in a worker process).
# ---------------------------------------------------------------------------
def _skeleton(path, backend):
    return {
        "notebook": str(path),
        "exercise": None,
        "backend": backend,
        "score": 0,
        "max_score": 0,
        "status": "error",
        "message": None,
        "sha256": None,
        "duration_s": 0.0,
        "questions": [],
    }


def _finish(result, verdicts, start):
    result["questions"] = [v.as_dict() for v in verdicts]
    result["score"] = int(sum(v.points for v in verdicts))
    result["max_score"] = int(sum(v.max_points for v in verdicts))
    result["duration_s"] = round(time.monotonic() - start, 2)
    return result


def _choose_set(nb, exercise):
    """The exercise set for a notebook, or raise ``LookupError`` with the reason."""
    if exercise:
        return registry.get_exercise_set(exercise)
    sets = registry.exercise_sets()
    from_metadata = notebooks.metadata_exercise_id(nb)
    if from_metadata in sets:
        return sets[from_metadata]
    found = registry.find_exercise_set(notebooks.defined_functions(nb))
    if found is not None:
        return found
    reason = (
        f"its metadata names an unknown exercise set {from_metadata!r}"
        if from_metadata
        else "it has no keras_decoder metadata and defines no function of a known set"
    )
    raise LookupError(f"cannot tell which exercise set this notebook is: {reason}; pass --exercise")


def _undefined_detail(name, record, stop_note):
    for statement, error in record.statement_errors:
        if name in statement.defines or f"def {name}(" in statement.source:
            return f"Its cell raised {error} ({statement.where})."
    return stop_note


def _verdicts(exercise_set, cases_by_name, record, timeout):
    stop_note = next((n for n in record.notes if "not run" in n), "")
    stop_note = f"Note: {stop_note}." if stop_note else ""
    verdicts = []
    for question in exercise_set.questions:
        kind, detail = record.results.get(question.name, ("died", "it was not run"))
        if kind == "outcomes":
            verdicts.append(evaluate(question, cases_by_name[question.name], detail))
        elif kind == "undefined":
            verdicts.append(not_defined(question, _undefined_detail(question.name, record, stop_note)))
        elif kind == "timeout":
            verdicts.append(
                Verdict(question.name, "timeout", 0, question.points,
                        f"`{question.name}` ran longer than {timeout:g} s and was stopped.")
            )
        elif kind == "died":
            verdicts.append(
                Verdict(question.name, "error", 0, question.points, f"`{question.name}` could not be graded: {detail}.")
            )
        else:
            verdicts.append(
                Verdict(question.name, "error", 0, question.points,
                        f"The grader could not read the results of `{question.name}`: {detail}.")
            )
    return verdicts


def _message(record):
    parts = list(record.notes)
    if record.statement_errors:
        statement, error = record.statement_errors[0]
        more = len(record.statement_errors) - 1
        parts.append(
            f"{len(record.statement_errors)} top-level statement(s) raised an error; first: {statement.where}: {error}"
            + (f" (and {more} more)" if more else "")
        )
    if record.blocked:
        shown = "; ".join(record.blocked[:5])
        parts.append(f"the grader blocked {len(record.blocked)} operation(s): {shown}")
    if record.kernels > 1:
        parts.append(f"{record.kernels} kernels were used")
    return "; ".join(parts) if parts else None


def grade_one(
    path,
    *,
    exercise=None,
    backend="tensorflow",
    timeout=DEFAULT_TIMEOUT,
    memory_limit_mb=DEFAULT_MEMORY_MB,
    device="cpu",
    deny=None,
    scratch=None,
    on_pid=None,
):
    """Grade one notebook in this process (the kernel is a child process).

    Prefer :func:`grade_paths`, which runs this in a separate worker process.

    Returns:
        A dict following :data:`RESULT_SCHEMA`'s item schema.
    """
    start = time.monotonic()
    path = Path(path)
    result = _skeleton(path, backend)
    try:
        data = path.read_bytes()
    except OSError as exc:
        result["message"] = f"cannot read the file: {exc.strerror or exc}"
        return _finish(result, [], start)
    result["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        nb = notebooks.read_submission(data)
    except notebooks.NotebookError as exc:
        result["message"] = f"not a valid notebook: {exc}"
        return _finish(result, [], start)
    try:
        exercise_set = _choose_set(nb, exercise)
    except (LookupError, KeyError) as exc:
        result["message"] = str(exc).strip("'\"")
        return _finish(result, [], start)
    result["exercise"] = exercise_set.id
    result["max_score"] = exercise_set.max_score
    try:
        statements = notebooks.code_statements(nb)
    except notebooks.NotebookError as exc:
        result["message"] = f"cannot run this notebook: {exc}"
        return _finish(result, [not_defined(q) for q in exercise_set.questions], start)
    if not statements:
        result["status"] = "graded"
        result["message"] = "the notebook has no code"
        return _finish(result, [not_defined(q) for q in exercise_set.questions], start)

    rng = np.random.default_rng(secrets.randbits(128))
    cases_by_name = {q.name: q.make_cases(rng) for q in exercise_set.questions}
    own_scratch = scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="keras-decoder-kernel-")) if own_scratch else Path(scratch)
    try:
        record = runner.run_submission(
            statements,
            cases_by_name,
            scratch=scratch,
            backend=backend,
            timeout=float(timeout),
            memory_limit=int(memory_limit_mb) * 2**20,
            deny=default_deny([path]) if deny is None else deny,
            device=device,
            nonce=secrets.token_hex(8),
            on_pid=on_pid,
        )
    finally:
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    # The kernel is gone: only now are the expected outputs computed.
    if record.fatal:
        result["message"] = record.fatal
        verdicts = [
            Verdict(q.name, "error", 0, q.points, f"not graded: {record.fatal}") for q in exercise_set.questions
        ]
        return _finish(result, verdicts, start)
    verdicts = _verdicts(exercise_set, cases_by_name, record, float(timeout))
    result["status"] = "timeout" if record.timed_out else "graded"
    result["message"] = _message(record)
    return _finish(result, verdicts, start)


# ---------------------------------------------------------------------------
# Many notebooks (the main process).
# ---------------------------------------------------------------------------
def _hard_limit(timeout, n_questions):
    per_kernel = 2 * runner.STARTUP_TIMEOUT + timeout + 4 * runner.PROBE_TIMEOUT
    return runner.MAX_KERNELS * per_kernel + n_questions * (timeout + runner.PROBE_TIMEOUT) + 60


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _kill_kernels(pid_file):
    try:
        pids = [int(line) for line in Path(pid_file).read_text().split() if line.strip().isdigit()]
    except OSError:
        return
    for pid in pids:
        _kill_group(pid)


def _worker_failure(path, backend, message, start):
    result = _skeleton(path, backend)
    result["message"] = message
    result["duration_s"] = round(time.monotonic() - start, 2)
    return result


def _valid_result(data):
    return (
        isinstance(data, dict)
        and data.get("status") in NOTEBOOK_STATUSES
        and isinstance(data.get("questions"), list)
        and isinstance(data.get("score"), int)
    )


def grade_paths(
    paths,
    *,
    exercise=None,
    backend="tensorflow",
    timeout=DEFAULT_TIMEOUT,
    memory_limit_mb=DEFAULT_MEMORY_MB,
    jobs=1,
    device="cpu",
    progress=None,
):
    """Grade every notebook in ``paths`` (files or folders), each in its own worker.

    Args:
        paths: notebooks and/or folders of notebooks.
        exercise: force the exercise set id (default: per notebook, from its
            metadata or the functions it defines).
        backend: the Keras backend of the grading kernels.
        timeout: seconds for a notebook's code, and again for each question.
        memory_limit_mb: memory a submission may allocate beyond the backend's.
        jobs: notebooks graded at the same time.
        device: ``"cpu"`` (default) or ``"auto"`` (let the kernel see GPUs).
        progress: ``progress(done, total, result)``, called as each finishes.

    Returns:
        One result dict per notebook, in the order of ``find_notebooks(paths)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Expected a backend in {BACKENDS}. Received: backend={backend!r}")
    notebooks_found = find_notebooks(paths)
    deny = default_deny(notebooks_found + [Path(p) for p in paths])
    n_questions = max((len(s.questions) for s in registry.exercise_sets().values()), default=1)
    hard_limit = _hard_limit(float(timeout), n_questions)
    worker = Path(__file__).with_name("worker.py")
    root = Path(tempfile.mkdtemp(prefix="keras-decoder-grade-"))
    results = [None] * len(notebooks_found)
    queue = list(enumerate(notebooks_found))
    running = {}
    done = 0
    try:
        while queue or running:
            while queue and len(running) < max(1, int(jobs)):
                index, path = queue.pop(0)
                job_dir = root / f"job-{index}"
                job_dir.mkdir()
                job = {
                    "path": str(path),
                    "exercise": exercise,
                    "backend": backend,
                    "timeout": float(timeout),
                    "memory_limit_mb": int(memory_limit_mb),
                    "device": device,
                    "deny": deny,
                    "scratch": str(job_dir / "scratch"),
                    "pids": str(job_dir / "kernels.pid"),
                    "result": str(job_dir / "result.json"),
                }
                (job_dir / "job.json").write_text(json.dumps(job))
                log = open(job_dir / "worker.log", "wb")
                env = dict(os.environ, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3")
                proc = subprocess.Popen(
                    [sys.executable, str(worker), str(job_dir / "job.json")],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True,
                )
                log.close()
                running[index] = (proc, job_dir, path, time.monotonic())
            time.sleep(0.05)
            for index in list(running):
                proc, job_dir, path, started = running[index]
                code = proc.poll()
                if code is None and time.monotonic() - started < hard_limit:
                    continue
                if code is None:  # past the hard limit
                    _kill_group(proc.pid)
                    proc.wait()
                    _kill_kernels(job_dir / "kernels.pid")
                    result = _worker_failure(
                        path, backend, f"grading did not finish within {hard_limit:.0f} s and was stopped", started
                    )
                    result["status"] = "timeout"
                else:
                    _kill_kernels(job_dir / "kernels.pid")  # normally gone already
                    try:
                        result = json.loads((job_dir / "result.json").read_text())
                        if not _valid_result(result):
                            raise ValueError("malformed result")
                    except (OSError, ValueError):
                        tail = ""
                        try:
                            tail = (job_dir / "worker.log").read_text(errors="replace").strip().splitlines()[-1][:300]
                        except (OSError, IndexError):
                            pass
                        result = _worker_failure(
                            path, backend, f"the grader's worker failed (exit code {code}){': ' + tail if tail else ''}",
                            started,
                        )
                results[index] = result
                del running[index]
                done += 1
                if progress is not None:
                    progress(done, len(notebooks_found), result)
    finally:
        for proc, job_dir, _, _ in running.values():
            _kill_group(proc.pid)
            _kill_kernels(job_dir / "kernels.pid")
        shutil.rmtree(root, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------
def write_json(results, file):
    """Write the results as a JSON list (:data:`RESULT_SCHEMA`)."""
    Path(file).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def csv_columns(results):
    """The CSV header: fixed columns, one per question (in exercise-set order), then message."""
    questions = []
    sets = registry.exercise_sets()
    for exercise_id in dict.fromkeys(r["exercise"] for r in results if r.get("exercise")):
        if exercise_id in sets:
            questions += [q.name for q in sets[exercise_id].questions if q.name not in questions]
    for r in results:
        questions += [q["name"] for q in r["questions"] if q["name"] not in questions]
    return ["notebook", "exercise", "backend", "status", "score", "max_score", *questions, "message"], questions


def write_csv(results, file):
    """Write one row per notebook; each question's column holds the points earned."""
    header, questions = csv_columns(results)
    with open(file, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for r in results:
            points = {q["name"]: q["points"] for q in r["questions"]}
            writer.writerow(
                [r["notebook"], r["exercise"] or "", r["backend"], r["status"], r["score"], r["max_score"]]
                + [points.get(name, "") for name in questions]
                + [r["message"] or ""]
            )


def format_table(result, width=100):
    """A plain-text table of one notebook's result."""
    head = (
        f"{result['notebook']}  [{result['exercise'] or '?'}, {result['backend']}]  "
        f"{result['status']}  {result['score']}/{result['max_score']} points  ({result['duration_s']:.1f} s)"
    )
    lines = [head]
    if result["message"]:
        lines.append(f"  note: {result['message']}")
    if result["questions"]:
        name_width = max(8, *(len(q["name"]) for q in result["questions"]))
        lines.append(f"  {'question':<{name_width}}  points  {'status':<13}  feedback")
        for q in result["questions"]:
            feedback = q["feedback"].splitlines()[0] if q["feedback"] else ""
            room = max(20, width - name_width - 28)
            if len(feedback) > room:
                feedback = feedback[: room - 3] + "..."
            lines.append(
                f"  {q['name']:<{name_width}}  {q['points']:>2}/{q['max_points']:<3}  {q['status']:<13}  {feedback}"
            )
    return "\n".join(lines)
