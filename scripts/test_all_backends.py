"""Run the whole test suite once per Keras backend, each in its own process.

``KERAS_BACKEND`` must be set before Keras is imported, so one process cannot
test three backends. This prints a summary line per backend and exits non-zero
if any backend failed. Extra arguments are passed on to pytest, and
``BACKENDS=jax,torch`` limits the backends run.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("tensorflow", "jax", "torch")
SUMMARY = re.compile(r"^=*\s*((?:\d+ [a-z]+,? ?)+) in ([\d.]+)s\b.*$")


# Two workers by default (this is a 2-core machine); --dist loadscope keeps
# each notebook's cells together on one worker, as nbval needs.
WORKERS = os.environ.get("PYTEST_WORKERS", "2")
COMMON = ["-p", "no:cacheprovider", "-q", "-rs"] + (
    ["-n", WORKERS, "--dist", "loadscope"] if WORKERS not in ("0", "1") else [])
NBVAL = ["--nbval-current-env", "--nbval-sanitize-with", "lessons/nbval_sanitize.cfg"]


def _notebooks(folder, pattern):
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(pattern)
                  if ".ipynb_checkpoints" not in p.parts)


def phases(extra):
    """What one backend runs, as separate pytest invocations.

    1. the unit tests and the lessons, the lessons under strict nbval (every
       output compared unless a cell is tagged);
    2. the exercise notebooks (sources and learner versions) under
       ``--nbval-lax``: they must run top to bottom without error, but a
       learner notebook has no committed outputs to compare.

    With explicit paths in ``extra`` only those are run (one invocation).
    """
    if extra and not extra[0].startswith("-"):
        return [COMMON + extra]
    lessons = _notebooks("lessons", "*.ipynb")
    first = COMMON + ["tests"] + (lessons + ["--nbval"] + NBVAL if lessons else []) + extra
    runs = [first]
    exercises = _notebooks("exercises", "*.ipynb") + _notebooks("exercises/source", "*.ipynb")
    if exercises:
        runs.append(COMMON + exercises + ["--nbval-lax"] + NBVAL + extra)
    return runs


def environment(backend):
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("PYTHONWARNINGS", "ignore")
    if shutil.which("nvidia-smi") is None:  # use a GPU when there is one
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def main(extra):
    wanted = os.environ.get("BACKENDS", ",".join(BACKENDS)).split(",")
    results, start = [], time.time()
    for backend in wanted:
        print(f"\n######## KERAS_BACKEND={backend} ########", flush=True)
        t0, code, summaries = time.time(), 0, []
        for args in phases(extra):
            proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", *args],
                cwd=ROOT, env=environment(backend), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, bufsize=1,
            )
            summary = "no summary line"
            for line in proc.stdout:
                sys.stdout.write(line)
                match = SUMMARY.match(line.strip())
                if match:
                    summary = match.group(1)
            rc = proc.wait()
            code = code or rc
            summaries.append(summary)
        results.append((backend, code, " | ".join(summaries), time.time() - t0))
    print("\n======== per-backend summary ========")
    for backend, code, summary, seconds in results:
        verdict = "PASS" if code == 0 else f"FAIL (exit {code})"
        print(f"{backend:>10}: {verdict}: {summary} [{seconds:.0f} s]")
    print(f"total wall time: {time.time() - start:.0f} s")
    return 0 if all(code == 0 for _, code, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
