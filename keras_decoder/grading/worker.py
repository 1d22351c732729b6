"""The grader's worker: grade one notebook, in its own process.

Run as a script by :func:`keras_decoder.grading.grader.grade_paths`::

    python .../keras_decoder/grading/worker.py JOB.json

``JOB.json`` holds the options; the worker writes the result (JSON) to the
path the job names, and the process id of each kernel it starts to the
job's ``pids`` file, so that the main process can stop everything if the
worker itself has to be killed.

Run as a script, the worker imports ``keras_decoder.grading`` without running
``keras_decoder/__init__.py``: the grader needs NumPy, nbclient and the
exercise registry, not Keras or a backend.
"""

import json
import os
import sys
import types
from pathlib import Path


def _bootstrap():
    """Make ``keras_decoder.grading`` importable without importing ``keras_decoder/__init__``."""
    here = Path(__file__).resolve().parent
    if sys.path and Path(sys.path[0] or ".").resolve() == here:
        sys.path.pop(0)  # do not shadow stdlib modules with this folder's files
    # jsonschema (through nbformat) imports rfc3987_syntax when it is installed, which
    # builds a parser at import time (seconds); the grader never validates IRIs.
    sys.modules.setdefault("rfc3987_syntax", None)
    if "keras_decoder" not in sys.modules:
        package = types.ModuleType("keras_decoder")
        package.__path__ = [str(here.parent)]
        package.__file__ = str(here.parent / "__init__.py")
        sys.modules["keras_decoder"] = package


def main(argv):
    """Grade the notebook of the job file ``argv[0]``; return the exit code."""
    job = json.loads(Path(argv[0]).read_text())
    from keras_decoder.grading.grader import grade_one

    pids = job.get("pids")

    def on_pid(pid):
        if pids:
            with open(pids, "a") as handle:
                handle.write(f"{pid}\n")

    Path(job["scratch"]).mkdir(parents=True, exist_ok=True)
    result = grade_one(
        job["path"],
        exercise=job.get("exercise"),
        backend=job["backend"],
        timeout=job["timeout"],
        memory_limit_mb=job["memory_limit_mb"],
        device=job.get("device", "cpu"),
        deny=job.get("deny"),
        scratch=job["scratch"],
        on_pid=on_pid,
    )
    temporary = job["result"] + ".tmp"
    Path(temporary).write_text(json.dumps(result))
    os.replace(temporary, job["result"])
    return 0


if __name__ == "__main__":
    _bootstrap()
    sys.exit(main(sys.argv[1:]))
