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
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
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
    if backend == "torch" and WORKERS not in ("0", "1"):
        # Two workers (and their notebook kernels) already fill the two cores.
        # A second OpenMP thread per process only oversubscribes them, and
        # torch's threads then spin-wait at every small op: a 12 s lesson
        # took 145 s. One thread each keeps every process busy.
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def notebook_seconds(junit_xml):
    """``{notebook path: seconds}`` from a JUnit report: the sum of its cells'
    setup + call + teardown times (kernel start included, pytest start not)."""
    seconds = defaultdict(float)
    try:
        tree = ET.parse(junit_xml)
    except (OSError, ET.ParseError):
        return seconds
    for case in tree.iter("testcase"):
        name = case.get("file") or case.get("classname", "")
        if ".ipynb" in name:
            name = name[: name.index(".ipynb") + len(".ipynb")].replace(".", "/", name.count(".") - 1)
            seconds[name] += float(case.get("time", 0.0))
    return seconds


def print_notebook_times(times, backends):
    """One row per notebook, one column per backend (seconds)."""
    names = sorted({name for per_backend in times.values() for name in per_backend})
    if not names:
        return
    print("\n======== notebook run times (s, cells incl. kernel start) ========")
    print(f"{'notebook':<56}" + "".join(f"{b:>12}" for b in backends))
    for name in names:
        print(f"{name:<56}" + "".join(
            f"{times[b].get(name, float('nan')):>12.1f}" for b in backends))


def main(extra):
    wanted = os.environ.get("BACKENDS", ",".join(BACKENDS)).split(",")
    results, start = [], time.time()
    scratch = Path(tempfile.mkdtemp(prefix="keras-decoder-junit-"))
    times = {}
    for backend in wanted:
        print(f"\n######## KERAS_BACKEND={backend} ########", flush=True)
        t0, code, summaries = time.time(), 0, []
        times[backend] = {}
        for i, args in enumerate(phases(extra)):
            junit = scratch / f"{backend}-{i}.xml"
            proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", *args, f"--junitxml={junit}"],
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
            times[backend].update(notebook_seconds(junit))
        results.append((backend, code, " | ".join(summaries), time.time() - t0))
    shutil.rmtree(scratch, ignore_errors=True)
    print_notebook_times(times, wanted)
    print("\n======== per-backend summary ========")
    for backend, code, summary, seconds in results:
        verdict = "PASS" if code == 0 else f"FAIL (exit {code})"
        print(f"{backend:>10}: {verdict}: {summary} [{seconds:.0f} s]")
    print(f"total wall time: {time.time() - start:.0f} s")
    return 0 if all(code == 0 for _, code, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
