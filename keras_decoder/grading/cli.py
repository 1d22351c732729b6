"""The ``keras-decoder`` command line.

::

    keras-decoder exercises list [--json]
    keras-decoder exercises build [--check] [--root DIR]
    keras-decoder grade PATH... [--exercise ID] [--json FILE] [--csv FILE]
                       [--timeout SECONDS] [--backend tensorflow|jax|torch]
                       [--memory-limit MB] [--jobs N] [--device cpu|auto] [--quiet]

Exit codes: 0 when the command completed (whatever the scores), 1 for
``exercises build --check`` when a learner notebook is out of date, 2 for
usage errors (bad options, missing paths, no notebooks, unknown exercise or
backend).
"""

import argparse
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

USAGE_ERROR = 2


def _registry():
    from . import registry

    return registry


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _default_backend():
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    return backend if backend in ("tensorflow", "jax", "torch") else "tensorflow"


def build_parser():
    """The argument parser (exposed for the docs and the tests)."""
    parser = argparse.ArgumentParser(
        prog="keras-decoder",
        description="Exercise sets and the autograder of the keras-decoder course.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    exercises = commands.add_parser("exercises", help="list or build the exercise sets")
    sub = exercises.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="exercise ids, notebooks, questions and points")
    listing.add_argument("--json", action="store_true", help="print JSON instead of text")
    build = sub.add_parser("build", help="generate the learner notebooks from exercises/source/")
    build.add_argument("--check", action="store_true", help="only check that they are up to date (exit 1 if not)")
    build.add_argument("--root", help="the repository root (default: found from here or from the package)")

    grade = commands.add_parser(
        "grade",
        help="grade submitted notebooks",
        description="Grade notebooks, each in a fresh kernel with a time and memory limit. "
        "Exit code 0 when grading completed, whatever the scores.",
    )
    grade.add_argument("paths", nargs="+", metavar="PATH", help="notebooks or folders of notebooks")
    grade.add_argument("--exercise", metavar="ID", help="the exercise set (default: from each notebook)")
    grade.add_argument("--json", metavar="FILE", help="write the results as JSON")
    grade.add_argument("--csv", metavar="FILE", help="write one CSV row per notebook")
    grade.add_argument(
        "--timeout", type=_positive_float, default=60.0, metavar="SECONDS",
        help="wall-clock limit for a notebook's code, and again for each question (default 60)",
    )
    grade.add_argument(
        "--backend", choices=("tensorflow", "jax", "torch"), default=_default_backend(),
        help="Keras backend of the grading kernels (default: $KERAS_BACKEND or tensorflow)",
    )
    grade.add_argument(
        "--memory-limit", type=_positive_int, default=2048, metavar="MB",
        help="memory a submission may use beyond the backend's own (default 2048)",
    )
    grade.add_argument("--jobs", type=_positive_int, default=1, metavar="N", help="notebooks graded at once (default 1)")
    grade.add_argument(
        "--device", choices=("cpu", "auto"), default="cpu",
        help="cpu (default): hide GPUs from grading kernels; auto: let them use one",
    )
    grade.add_argument("--quiet", action="store_true", help="no table per notebook, only the summary")
    return parser


# ---------------------------------------------------------------------------
# exercises
# ---------------------------------------------------------------------------
def _exercises_list(args):
    sets = _registry().exercise_sets()
    entries = [
        {
            "id": s.id,
            "title": s.title,
            "notebook": s.notebook,
            "source": s.source,
            "max_score": s.max_score,
            "questions": [
                {"name": q.name, "signature": q.signature, "points": q.points, "summary": q.summary}
                for q in s.questions
            ],
        }
        for s in sets.values()
    ]
    if args.json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
        return 0
    for entry in entries:
        print(f"{entry['id']}: {entry['title']} ({entry['max_score']} points)")
        print(f"  learner notebook: {entry['notebook']}")
        print(f"  source notebook:  {entry['source']}")
        width = max(len(q["signature"]) for q in entry["questions"])
        for q in entry["questions"]:
            unit = "point" if q["points"] == 1 else "points"
            print(f"  {q['signature']:<{width}}  {q['points']} {unit:<6}  {q['summary']}")
    return 0


def _find_root(explicit):
    candidates = [Path(explicit)] if explicit else [Path.cwd(), Path(__file__).resolve().parents[2]]
    for root in candidates:
        if (root / "exercises" / "source").is_dir():
            return root
    return None


def _exercises_build(args):
    from .notebooks import NotebookError, build_exercises

    root = _find_root(args.root)
    if root is None:
        print("keras-decoder: no exercises/source/ folder found; pass --root", file=sys.stderr)
        return USAGE_ERROR
    try:
        results = build_exercises(root, check=args.check)
    except NotebookError as exc:
        print(f"keras-decoder: {exc}", file=sys.stderr)
        return 1
    stale = 0
    for source, target, up_to_date in results:
        relative = target.relative_to(root) if target.is_relative_to(root) else target
        if up_to_date:
            print(f"up to date: {relative}")
        elif args.check:
            stale += 1
            print(f"OUT OF DATE: {relative} (run `make exercises`)")
        else:
            print(f"wrote: {relative}")
    if not results:
        print("no source notebooks in exercises/source/")
    return 1 if stale else 0


# ---------------------------------------------------------------------------
# grade
# ---------------------------------------------------------------------------
_BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def _progress_printer(stream):
    tty = stream.isatty()

    def progress(done, total, result):
        name = Path(result["notebook"]).name
        text = f"[{done}/{total}] {name}: {result['status']} {result['score']}/{result['max_score']}"
        if tty:
            width = 30
            filled = int(width * done / max(total, 1))
            bar = "#" * filled + "-" * (width - filled)
            stream.write(f"\r[{bar}] {done}/{total} {name[:40]:<40}")
            if done == total:
                stream.write("\n")
        else:
            stream.write(text + "\n")
        stream.flush()

    return progress


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _grade(args, parser):
    from . import grader

    registry = _registry()
    for module in ("nbclient", "nbformat", "ipykernel"):
        if importlib.util.find_spec(module) is None:
            parser.error(f"grading needs {module}: pip install 'keras-decoder[course]'")
    if args.exercise and args.exercise not in registry.exercise_sets():
        parser.error(f"unknown exercise {args.exercise!r}; known: {', '.join(registry.exercise_sets())}")
    if importlib.util.find_spec(_BACKEND_MODULES[args.backend]) is None:
        parser.error(f"backend {args.backend!r} is not installed in this Python")
    for option in ("json", "csv"):
        target = getattr(args, option)
        if target and not Path(target).resolve().parent.is_dir():
            parser.error(f"--{option}: folder {Path(target).resolve().parent} does not exist")
    try:
        found = grader.find_notebooks(args.paths)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    if not found:
        parser.error("no notebooks (*.ipynb) found in " + ", ".join(args.paths))

    printed = []

    def progress(done, total, result):
        if not args.quiet:
            sys.stdout.write(grader.format_table(result) + "\n\n")
            sys.stdout.flush()
        printed.append(result)
        bar(done, total, result)

    bar = _progress_printer(sys.stderr)
    print(
        f"Grading {len(found)} notebook(s) with backend {args.backend}, timeout {args.timeout:g} s, "
        f"memory limit {args.memory_limit} MB, {args.jobs} at a time.",
        file=sys.stderr,
    )
    # On SIGTERM/SIGHUP, unwind normally, so that workers and kernels are stopped.
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        try:
            previous[name] = signal.signal(getattr(signal, name), _raise_exit)
        except (AttributeError, ValueError):  # no such signal, or not the main thread
            pass
    try:
        results = grader.grade_paths(
            args.paths,
            exercise=args.exercise,
            backend=args.backend,
            timeout=args.timeout,
            memory_limit_mb=args.memory_limit,
            jobs=args.jobs,
            device=args.device,
            progress=progress,
        )
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
    if args.json:
        grader.write_json(results, args.json)
    if args.csv:
        grader.write_csv(results, args.csv)
    counts = {s: sum(r["status"] == s for r in results) for s in grader.NOTEBOOK_STATUSES}
    total = sum(r["score"] for r in results)
    maximum = sum(r["max_score"] for r in results)
    print(
        f"{len(results)} notebook(s): {counts['graded']} graded, {counts['timeout']} timeout, "
        f"{counts['error']} error; {total}/{maximum} points in all."
    )
    return 0


def main(argv=None):
    """Entry point of ``keras-decoder``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "exercises":
        return _exercises_list(args) if args.action == "list" else _exercises_build(args)
    return _grade(args, parser)


if __name__ == "__main__":
    sys.exit(main())
