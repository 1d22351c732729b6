"""Run one submission in a fresh kernel, under limits, and bring back plain data.

The grader's process (a worker, see :mod:`keras_decoder.grading.grader`):

1. starts a fresh IPython kernel with nbclient, in a scratch folder, with a
   minimal environment (``KERAS_BACKEND`` = the chosen backend; no GPU unless
   asked; ``HOME``, ``IPYTHONDIR`` and the Jupyter folders inside the scratch
   folder, so no user start-up files run);
2. runs the harness preamble (:mod:`keras_decoder.grading._harness`): backend
   import, inputs, ``keras_decoder`` stub, resource limits, audit hook;
3. runs the learner's code, one top-level statement per cell, so that an error
   in one statement does not stop the next, and a statement that hangs or kills
   the kernel can be skipped after a restart;
4. calls each question's function through the harness (one cell per question)
   and decodes the arrays it publishes (``.npy`` bytes, ``allow_pickle=False``).

Every cell has a wall-clock limit. A cell that runs out of time is
interrupted; a kernel that ignores the interrupt, dies (``os._exit``, a crash)
or exceeds the memory limit (a watchdog reads its resident memory) is killed
and a fresh one continues with the remaining questions, at most
``MAX_KERNELS`` kernels per submission.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from . import _harness
from .spec import Outcome

__all__ = ["MIME", "KernelSession", "RunRecord", "run_submission", "kernel_environment"]

MIME = "application/vnd.keras-decoder.result+json"
MAX_KERNELS = 3
STARTUP_TIMEOUT = 180.0  # kernel start plus backend import, in seconds
PROBE_TIMEOUT = 5.0  # how long an interrupted kernel gets to answer again
OUTPUT_LIMIT = 1_000_000  # characters of ordinary output kept per cell
MAX_PAYLOAD_CHARS = 64 * 2**20


# ---------------------------------------------------------------------------
# The kernel.
# ---------------------------------------------------------------------------
def kernel_environment(backend, scratch, device="cpu"):
    """The kernel's environment: a few variables from ours, the rest set here."""
    keep = (
        "PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "VIRTUAL_ENV",
        "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
        "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "XLA_FLAGS", "SYSTEMROOT",
    )
    env = {k: os.environ[k] for k in keep if k in os.environ}
    scratch = Path(scratch)
    for name in ("home", "tmp", "ipython", "jupyter", "mpl"):
        (scratch / name).mkdir(parents=True, exist_ok=True)
    env.update(
        KERAS_BACKEND=backend,
        HOME=str(scratch / "home"),
        KERAS_HOME=str(scratch / "home" / ".keras"),
        TMPDIR=str(scratch / "tmp"),
        IPYTHONDIR=str(scratch / "ipython"),
        JUPYTER_CONFIG_DIR=str(scratch / "jupyter"),
        JUPYTER_DATA_DIR=str(scratch / "jupyter"),
        JUPYTER_RUNTIME_DIR=str(scratch / "jupyter"),
        JUPYTER_PLATFORM_DIRS="1",
        MPLCONFIGDIR=str(scratch / "mpl"),
        MPLBACKEND="Agg",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONWARNINGS="ignore",
        PYTHONDONTWRITEBYTECODE="1",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
        TF_FORCE_GPU_ALLOW_GROWTH="true",
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
    )
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    elif shutil.which("nvidia-smi") is None:
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _client_class():
    """nbclient's ``NotebookClient``, keeping at most ``OUTPUT_LIMIT`` characters of output per cell."""
    from nbclient import NotebookClient

    class CappedClient(NotebookClient):
        """A client that drops a submission's output past a limit (but keeps results and errors)."""

        def output(self, outs, msg, display_id, cell_index):
            content = msg.get("content", {})
            data = content.get("data") or {}
            if msg.get("msg_type") == "error":
                return super().output(outs, msg, display_id, cell_index)
            if isinstance(data, dict) and MIME in data:
                # Keep only results for the call in flight (at most two: two is an error).
                payload, expect = data[MIME], getattr(self, "_kd_expect", None)
                if not isinstance(payload, dict) or expect is None:
                    return None
                if (payload.get("nonce"), payload.get("question", payload.get("report"))) != expect:
                    return None
                if sum(1 for o in outs if MIME in o.get("data", {})) >= 2:
                    return None
                return super().output(outs, msg, display_id, cell_index)
            size = len(str(content.get("text", "")))
            if isinstance(data, dict):
                size += sum(len(v) if isinstance(v, str) else 1000 for v in data.values())
            used = getattr(self, "_kd_used", {})
            self._kd_used = used
            if used.get(cell_index, 0) + size > OUTPUT_LIMIT:
                return None
            used[cell_index] = used.get(cell_index, 0) + size
            return super().output(outs, msg, display_id, cell_index)

    return CappedClient


@dataclasses.dataclass
class CellRun:
    """The result of running one cell: ``status`` is ok, error, timeout or dead."""

    status: str
    outputs: list
    error: str = ""


def _rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class KernelSession:
    """One fresh kernel, run one cell at a time with a wall-clock limit per cell.

    Args:
        env: the kernel's environment (:func:`kernel_environment`).
        cwd: its working folder.
        connection_file: where jupyter_client writes the connection file.
        on_pid: called with the kernel's process id once it has started.
    """

    def __init__(self, env, cwd, connection_file, on_pid=None):
        self.env, self.cwd, self.connection_file, self.on_pid = env, str(cwd), str(connection_file), on_pid
        self.client = None
        self.pid = None
        self.memory_exceeded = False
        self._watch_stop = threading.Event()
        self._watcher = None

    def start(self, timeout=STARTUP_TIMEOUT):
        """Start the kernel and its client; raise ``RuntimeError`` if it does not come up."""
        import ipykernel.kernelspec
        import nbformat
        from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
        from jupyter_client.manager import AsyncKernelManager

        class _ThisPython(KernelSpecManager):
            def get_kernel_spec(self, kernel_name):
                spec = ipykernel.kernelspec.get_kernel_dict()
                spec["argv"] = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
                return KernelSpec(resource_dir=ipykernel.kernelspec.RESOURCES, **spec)

        # nbclient is asynchronous: a blocking manager would stall its timeouts.
        km = AsyncKernelManager(kernel_name="keras-decoder-grader", kernel_spec_manager=_ThisPython())
        km.connection_file = self.connection_file
        if os.name == "posix":  # Unix sockets in the scratch folder, not TCP ports open to every local user
            km.transport = "ipc"
            km.ip = str(Path(self.connection_file).with_suffix(""))
        nb = nbformat.v4.new_notebook()
        self.client = _client_class()(
            nb,
            km=km,
            timeout=int(timeout),
            startup_timeout=int(timeout),
            allow_errors=True,
            interrupt_on_timeout=False,
            shutdown_kernel="immediate",
            iopub_timeout=5,
            raise_on_iopub_timeout=False,
            record_timing=False,
            store_widget_state=False,
            extra_arguments=[
                "--HistoryManager.enabled=False",
                "--InteractiveShell.cache_size=0",
                "--IPKernelApp.capture_fd_output=False",
            ],
        )
        try:
            self.client.start_new_kernel(env=self.env, cwd=self.cwd)
            process = getattr(getattr(km, "provisioner", None), "process", None)
            self.pid = getattr(process, "pid", None)
            if self.pid and self.on_pid:
                self.on_pid(self.pid)
            self.client.start_new_kernel_client()
        except Exception as exc:
            self.kill()
            raise RuntimeError(f"the kernel did not start ({type(exc).__name__}: {exc})") from None

    def watch_memory(self, limit_bytes, interval=0.2):
        """Kill the kernel if its resident memory grows past ``limit_bytes``."""
        if not self.pid or not limit_bytes:
            return

        def watch():
            while not self._watch_stop.wait(interval):
                rss = _rss_bytes(self.pid)
                if rss is None:
                    return
                if rss > limit_bytes:
                    self.memory_exceeded = True
                    self._signal(signal.SIGKILL)
                    return

        self._watcher = threading.Thread(target=watch, daemon=True, name="keras-decoder-memory-watch")
        self._watcher.start()

    def _signal(self, signum):
        if not self.pid:
            return
        try:
            os.killpg(self.pid, signum)  # the kernel leads its own process group
        except OSError:
            try:
                os.kill(self.pid, signum)
            except OSError:
                pass

    def _drain_tasks(self):
        """Cancel nbclient tasks left over from a cell that timed out or died."""
        try:
            from jupyter_core.utils import ensure_event_loop

            loop = ensure_event_loop()
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        except Exception:
            pass

    def alive(self):
        """Whether the kernel process is still running."""
        from jupyter_core.utils import run_sync

        try:
            return bool(self.client and self.client.km and run_sync(self.client.km.is_alive)())
        except Exception:
            return False

    def run(self, source, timeout, expect=None):
        """Run ``source`` as one cell, for at most ``timeout`` seconds; return a :class:`CellRun`.

        ``expect`` is the ``(nonce, question)`` of the harness result this cell
        should publish; other results are dropped as they arrive.
        """
        import nbformat
        from nbclient.exceptions import CellTimeoutError, DeadKernelError

        cell = nbformat.v4.new_code_cell(source)
        self.client.nb.cells.append(cell)
        index = len(self.client.nb.cells) - 1
        self.client.timeout = max(1, int(math.ceil(timeout)))
        self.client._kd_expect = expect
        status, error = "ok", ""
        try:
            self.client.execute_cell(cell, index, store_history=False)
        except CellTimeoutError:
            status = "timeout"
        except DeadKernelError:
            status = "dead"
        except Exception as exc:  # e.g. a broken connection
            status, error = ("error", f"{type(exc).__name__}: {exc}") if self.alive() else ("dead", "")
        finally:
            self._drain_tasks()
        outputs = list(cell.get("outputs", []))
        if status == "ok":
            for out in outputs:
                if out.get("output_type") == "error":
                    status = "error"
                    error = f"{out.get('ename', 'Error')}: {str(out.get('evalue', ''))[:400]}".rstrip(": ")
                    break
        if status in ("timeout", "error") and not self.alive():
            status = "dead"
        # free memory: a submission's outputs are not kept across cells
        cell["outputs"] = []
        return CellRun(status, outputs, error)

    def recover(self):
        """After a timeout: interrupt; ``True`` if the kernel answers again, else kill it."""
        from jupyter_core.utils import run_sync

        try:
            run_sync(self.client.km.interrupt_kernel)()
        except Exception:
            pass
        probe = self.run("None", PROBE_TIMEOUT)
        if probe.status in ("ok", "error"):
            return True
        self.kill()
        return False

    def kill(self):
        """Kill the kernel at once and release its resources."""
        self._watch_stop.set()
        self._signal(signal.SIGKILL)
        self.shutdown()

    def shutdown(self):
        """Stop the kernel (immediately) and the client's channels."""
        self._watch_stop.set()
        client = self.client
        if client is None:
            return
        try:
            if client.km is not None:
                client._cleanup_kernel()
        except Exception:
            self._signal(signal.SIGKILL)
        finally:
            self._drain_tasks()
            self.client = None


# ---------------------------------------------------------------------------
# One submission.
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class RunRecord:
    """What happened when a submission ran.

    Attributes:
        results: per question name, one of ``("outcomes", [Outcome, ...])``,
            ``("undefined", None)``, ``("timeout", None)``, ``("died", text)``
            or ``("unreadable", text)``.
        statement_errors: ``(Statement, "Type: message")`` for statements that raised.
        notes: what the instructor should know (timeouts, restarts, limits).
        blocked: operations the guard blocked, as reported by the kernel.
        fatal: why nothing could be graded, or ``None``.
        timed_out: whether any step ran out of time.
        kernels: how many kernels were started.
    """

    results: dict = dataclasses.field(default_factory=dict)
    statement_errors: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    blocked: list = dataclasses.field(default_factory=list)
    fatal: str | None = None
    timed_out: bool = False
    kernels: int = 0


def write_inputs(path, cases_by_name):
    """Write every question's cases to ``path`` (npz) and return the JSON manifest."""
    arrays, manifest = {}, {}

    def spec(value, key):
        if isinstance(value, np.ndarray):
            arrays[key] = value
            return {"array": key}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise TypeError(f"Case arguments must be arrays or Python scalars. Received: {type(value).__name__}")

    for qi, (name, cases) in enumerate(cases_by_name.items()):
        manifest[name] = []
        for ci, case in enumerate(cases):
            args = [spec(a, f"q{qi}c{ci}a{ai}") for ai, a in enumerate(case.args)]
            kwargs = {k: spec(v, f"q{qi}c{ci}k{k}") for k, v in case.kwargs.items()}
            manifest[name].append({"args": args, "kwargs": kwargs})
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    os.chmod(path, 0o600)
    return manifest


def _decode(case, max_elements=_harness.MAX_ELEMENTS):
    """One case of a harness payload to an :class:`Outcome`; ``ValueError`` if malformed."""
    if not isinstance(case, dict) or case.get("status") not in ("ok", "not_implemented", "error", "bad_output", "timeout"):
        raise ValueError("a case has no valid status")
    status = case["status"]
    if status != "ok":
        error = case.get("error", "")
        return Outcome(status, error=str(error)[:600] if isinstance(error, str) else "")
    data = case.get("npy")
    if not isinstance(data, str) or len(data) > MAX_PAYLOAD_CHARS:
        raise ValueError("an array is missing or too large")
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=True)
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (binascii.Error, ValueError, UnicodeError, OSError, EOFError) as exc:
        raise ValueError(f"an array cannot be read ({type(exc).__name__})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf" or array.size > max_elements:
        raise ValueError("an array has an unexpected type or size")
    return Outcome("ok", value=array)


def parse_payload(outputs, nonce, name, n_cases):
    """Find and decode the harness's result for question ``name`` in a cell's outputs."""
    payloads = []
    for out in outputs:
        data = out.get("data") if isinstance(out, dict) else None
        if isinstance(data, dict) and MIME in data:
            payload = data[MIME]
            if isinstance(payload, dict) and payload.get("nonce") == nonce and payload.get("question") == name:
                payloads.append(payload)
    if len(payloads) != 1:
        return ("unreadable", "no result came back" if not payloads else "more than one result came back")
    payload = payloads[0]
    if payload.get("defined") is False:
        return ("undefined", None)
    cases = payload.get("cases")
    if not isinstance(cases, list) or not cases or len(cases) > n_cases:
        return ("unreadable", "the result has the wrong number of cases")
    try:
        outcomes = [_decode(c) for c in cases]
    except ValueError as exc:
        return ("unreadable", str(exc))
    if len(outcomes) < n_cases:
        if outcomes[-1].kind != "timeout":
            return ("unreadable", "the result has the wrong number of cases")
        outcomes += [Outcome("timeout")] * (n_cases - len(outcomes))
    if any(o.kind == "timeout" for o in outcomes):
        return ("timeout", None)
    return ("outcomes", outcomes)


def _preamble(nonce, params):
    source = Path(_harness.__file__).read_text(encoding="utf-8")
    return (
        f"_kd_boot = {{'__name__': '_keras_decoder_harness'}}\n"
        f"exec(compile({source!r}, '<keras-decoder harness>', 'exec'), _kd_boot)\n"
        f"_kd_{nonce} = _kd_boot['setup']({params!r})\n"
        f"del _kd_boot\n"
    )


def run_submission(
    statements,
    cases_by_name,
    *,
    scratch,
    backend,
    timeout,
    memory_limit,
    deny=(),
    device="cpu",
    nonce,
    on_pid=None,
    max_kernels=MAX_KERNELS,
):
    """Run the learner's ``statements`` and call every question; return a :class:`RunRecord`.

    Args:
        statements: :class:`~keras_decoder.grading.notebooks.Statement` list.
        cases_by_name: ``{function name: [Case, ...]}`` in question order.
        scratch: a private folder for this run (inputs, kernel home).
        backend: ``"tensorflow"``, ``"jax"`` or ``"torch"``.
        timeout: seconds for the learner's statements together, and again for
            each question's calls.
        memory_limit: bytes the learner's code may allocate beyond the
            kernel's size after the backend import.
        deny: paths the kernel may never read (the grader's package, the
            repository, the submissions).
        device: ``"cpu"`` (hide GPUs from the kernel) or ``"auto"``.
        nonce: a fresh random token for this run.
        on_pid: called with each kernel's process id.
    """
    scratch = Path(scratch)
    record = RunRecord()
    inputs = scratch / f"inputs-{nonce}.npz"
    manifest = write_inputs(inputs, cases_by_name)
    params = {
        "inputs": str(inputs),
        "manifest": manifest,
        "mime": MIME,
        "nonce": nonce,
        "memory_limit": int(memory_limit),
        "deny": [str(p) for p in deny] + [str(scratch)],
        # IPython keeps cell sources under TMPDIR for tracebacks; nothing else is there.
        "allow": [str(scratch / "tmp")],
        "blocked_module": "keras_decoder",
    }
    preamble = _preamble(nonce, params)
    harness = f"_kd_{nonce}"
    env = kernel_environment(backend, scratch, device)
    workdir = scratch / "work"
    workdir.mkdir(exist_ok=True)
    pending = list(cases_by_name)
    skip = set()  # statements that killed a kernel: not run again
    stop_at = len(statements)  # statements from here on are never run (the time ran out)
    errors_seen = set()

    while pending and record.kernels < max_kernels:
        record.kernels += 1
        session = KernelSession(env, workdir, scratch / f"kernel-{record.kernels}.json", on_pid=on_pid)
        try:
            session.start()
        except RuntimeError as exc:
            record.fatal = str(exc)
            return record
        try:
            boot = session.run(preamble, STARTUP_TIMEOUT)
            if boot.status != "ok":
                record.fatal = (
                    f"the grader could not prepare the kernel for backend {backend!r}: "
                    f"{boot.status} {boot.error}".strip()
                )
                return record
            baseline = _rss_bytes(session.pid) if session.pid else None
            if baseline and memory_limit:
                session.watch_memory(baseline + int(memory_limit) + 256 * 2**20)

            # The learner's code, one statement per cell, sharing `timeout` seconds.
            restart = False
            deadline = time.monotonic() + timeout
            for position, statement in enumerate(statements[:stop_at]):
                if position in skip:
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    stop_at = position
                    record.timed_out = True
                    record.notes.append(
                        f"the notebook's code ran out of time ({timeout:g} s): from {statement.where} on, "
                        "it was not run"
                    )
                    break
                run = session.run(statement.source, remaining)
                if run.status == "error" and position not in errors_seen:
                    errors_seen.add(position)
                    record.statement_errors.append((statement, run.error))
                elif run.status == "timeout":
                    # Like "Run All" in Jupyter: nothing after a cell that never finishes runs.
                    stop_at = position
                    record.timed_out = True
                    record.notes.append(
                        f"{statement.where} ran out of time ({timeout:g} s) and was stopped; "
                        "the code after it was not run"
                    )
                    if not session.recover():
                        restart = True
                    break
                elif run.status == "dead":
                    skip.add(position)
                    cause = "exceeded the memory limit" if session.memory_exceeded else "stopped the kernel"
                    record.notes.append(f"{statement.where} {cause}; it was skipped in a fresh kernel")
                    restart = True
                    break
            if restart:
                continue

            # The questions, each with its own `timeout` seconds.
            for name in list(pending):
                run = session.run(f"{harness}.call({name!r})", timeout, expect=(nonce, name))
                if run.status in ("ok", "error"):
                    record.results[name] = parse_payload(run.outputs, nonce, name, len(cases_by_name[name]))
                    if run.status == "error" and record.results[name][0] == "unreadable":
                        record.results[name] = ("unreadable", f"the call failed: {run.error}")
                    pending.remove(name)
                elif run.status == "timeout":
                    record.timed_out = True
                    record.results[name] = ("timeout", None)
                    pending.remove(name)
                    if not session.recover():
                        record.notes.append(f"`{name}` did not stop when interrupted; the kernel was restarted")
                        restart = True
                        break
                else:  # dead
                    cause = (
                        f"it exceeded the memory limit ({memory_limit // 2**20} MiB)"
                        if session.memory_exceeded
                        else "the kernel died (os._exit, a crash, or the memory limit)"
                    )
                    record.results[name] = ("died", cause)
                    record.notes.append(f"while calling `{name}` {cause}; the kernel was restarted")
                    pending.remove(name)
                    restart = True
                    break
            if restart:
                continue
            report = session.run(f"{harness}.report()", PROBE_TIMEOUT, expect=(nonce, True))
            for out in report.outputs:
                payload = (out.get("data") or {}).get(MIME)
                if isinstance(payload, dict) and payload.get("nonce") == nonce and payload.get("report"):
                    blocked = payload.get("blocked")
                    if isinstance(blocked, list):
                        record.blocked += [str(b)[:300] for b in blocked[:50]]
        finally:
            session.kill()
    for name in pending:
        record.results[name] = ("died", "it was not run: the kernel kept stopping")
    return record
