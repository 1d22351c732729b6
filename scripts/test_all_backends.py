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
SUMMARY = re.compile(r"^=+ (.*(?:passed|failed|error|skipped|no tests ran).*) in ([\d.]+)s.* =+$")


def pytest_args():
    """What one backend runs: the unit tests, then every notebook under nbval."""
    args = ["tests", "-p", "no:cacheprovider", "-q", "-rs"]
    notebooks = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "lessons").glob("*.ipynb"))
    notebooks += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "exercises").rglob("*.ipynb")
                        if ".ipynb_checkpoints" not in p.parts)
    if notebooks:
        args += notebooks + ["--nbval", "--nbval-current-env",
                             "--nbval-sanitize-with", "lessons/nbval_sanitize.cfg"]
    return args


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
        t0 = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", *pytest_args(), *extra],
            cwd=ROOT, env=environment(backend), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        summary = "no summary line"
        for line in proc.stdout:
            sys.stdout.write(line)
            match = SUMMARY.match(line.strip())
            if match:
                summary = match.group(1)
        code = proc.wait()
        results.append((backend, code, summary, time.time() - t0))
    print("\n======== per-backend summary ========")
    for backend, code, summary, seconds in results:
        verdict = "PASS" if code == 0 else f"FAIL (exit {code})"
        print(f"{backend:>10}: {verdict}: {summary} [{seconds:.0f} s]")
    print(f"total wall time: {time.time() - start:.0f} s")
    return 0 if all(code == 0 for _, code, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
