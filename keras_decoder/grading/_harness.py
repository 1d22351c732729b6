"""Code that runs *inside* the kernel that executes a submission.

The grader sends this module's source text to a fresh kernel as its first cell
and calls :func:`setup`. Nothing here decides a score: the kernel only calls
the learner's functions on the inputs the grader chose and sends back plain
arrays. Comparison and verdicts happen in the grader's process.

:func:`setup`, before any learner code runs:

1. imports NumPy and Keras (``KERAS_BACKEND`` comes from the kernel's
   environment) and runs one op, so the backend's runtime is initialised;
2. reads the inputs file (fresh random inputs, drawn by the grader for this
   run), keeps them in memory;
3. replaces ``keras_decoder`` by a stub: ``from keras_decoder.grading import
   load_exercise`` still works (``ex.check`` does nothing), every other
   ``keras_decoder`` import fails. The exercise is to write the functions, so
   graded code may not call the library's (or the grader's) versions;
4. sets resource limits: no core files, no file writes (``RLIMIT_FSIZE = 0``),
   a memory budget (``RLIMIT_DATA``: current data size + the limit);
5. installs an audit hook (PEP 578, it cannot be removed) that blocks, for the
   learner's code: starting processes, signals to other processes, sockets,
   ``ctypes``, ``mmap``, ``gc`` object walks, creating code objects, raising
   resource limits, every file write or rename, and reads outside the Python
   installation and the system library folders (so not the grader's files,
   the repository, or other submissions).

This is defence in depth against a learner's notebook, not a security boundary
against a determined attacker running arbitrary native code; see the README
("Grading", "What local grading can and cannot guarantee").

Stdlib, NumPy, Keras and IPython only; in particular not ``keras_decoder``.
"""

MAX_ELEMENTS = 1_000_000  # the largest array a graded function may return
_MAX_ERROR = 400  # characters of an exception message kept


def to_array(out, convert=None, asarray=None):
    """Convert a function's return value to a NumPy array.

    Accepts NumPy arrays and scalars, nested lists, and backend tensors
    (converted with ``keras.ops.convert_to_numpy``). Raises ``TypeError``
    with a description of the value for anything else (``None``, tuples,
    object arrays) and for arrays larger than :data:`MAX_ELEMENTS`.

    Args:
        out: the value.
        convert, asarray: ``keras.ops.convert_to_numpy`` and ``numpy.asarray``
            as captured before the learner's code ran (default: looked up now).
    """
    import sys

    import numpy as np

    asarray = asarray or np.asarray

    if out is None:
        raise TypeError("returned None (is a `return` missing?)")
    if isinstance(out, tuple):
        raise TypeError(f"returned a tuple of {len(out)} values; return one array")
    if isinstance(out, (dict, set, str, bytes)):
        raise TypeError(f"returned a {type(out).__name__}; return an array")
    if isinstance(out, (np.ndarray, np.generic, list, bool, int, float)):
        arr = asarray(out)
    else:
        arr = None
        if convert is None and sys.modules.get("keras") is not None:
            convert = sys.modules["keras"].ops.convert_to_numpy
        if convert is not None:
            try:
                arr = asarray(convert(out))
            except Exception:
                arr = None
        if arr is None:
            arr = asarray(out)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"returned a {type(out).__name__} that is not a numeric array (dtype {arr.dtype})")
    if arr.size > MAX_ELEMENTS:
        raise TypeError(f"returned an array of shape {arr.shape}, larger than the grader accepts")
    return arr


def describe_exception(exc):
    """``"TypeName: message"``, the message cut to a few hundred characters."""
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    if len(message) > _MAX_ERROR:
        message = message[:_MAX_ERROR] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# ---------------------------------------------------------------------------
# Everything below runs only in the grading kernel.
# ---------------------------------------------------------------------------
_DENIED_EVENTS = frozenset(
    {
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile", "pty.spawn",
        "resource.setrlimit", "resource.prlimit", "mmap.__new__", "gc.get_objects",
        "gc.get_referrers", "gc.get_referents", "sys.addaudithook", "setopencodehook",
        "code.__new__", "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
        "os.utime", "os.truncate", "os.symlink", "os.link", "os.chflags", "os.lchflags",
        "os.setxattr", "os.removexattr", "os.listxattr", "os.getxattr", "os.mkfifo", "os.mknod",
        "tempfile.mkstemp", "tempfile.mkdtemp", "dbm.open", "urllib.Request", "webbrowser.open",
        "sys.remote_exec",
    }
)
_DENIED_PREFIXES = (
    "ctypes.", "socket.", "shutil.", "sqlite3.", "http.client.", "ftplib.", "smtplib.", "poplib.",
    "imaplib.", "nntplib.", "telnetlib.", "_posixsubprocess.", "os.pidfd", "_winapi.", "winreg.",
    "msvcrt.",
)
_PATH_EVENTS = frozenset({"os.listdir", "os.scandir"})


def _make_guard(allow, deny, blocked_module, log):
    """Build the audit hook. State lives in default arguments, never in globals or cells.

    Everything the hook calls is captured here: builtins can be replaced by
    the learner (``builtins.len = ...``), C functions bound now cannot.
    """
    import os
    from stat import S_ISLNK

    def resolve(path, _lstat=os.lstat, _readlink=os.readlink, _getcwd=os.getcwd, _islnk=S_ISLNK,
                _oserror=OSError):
        if not path.startswith("/"):
            path = _getcwd() + "/" + path
        parts = [p for p in path.split("/") if p and p != "."]
        done, links = [], 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            candidate = "/" + "/".join(done + [part])
            try:
                mode = _lstat(candidate).st_mode
            except _oserror:
                done.append(part)
                continue
            if _islnk(mode):
                links += 1
                if links > 40:
                    return None
                target = _readlink(candidate)
                if target.startswith("/"):
                    done = []
                parts = [p for p in target.split("/") if p and p != "."] + parts
                continue
            done.append(part)
        return "/" + "/".join(done)

    def longest(real, prefixes):
        best = -1
        for p in prefixes:
            if (real == p or real.startswith(p + "/")) and p.__len__() > best:
                best = p.__len__()
        return best

    def permitted(path, _str=str, _bytes=bytes, _type=type, _resolve=resolve, _longest=longest,
                  _allow=tuple(allow), _deny=tuple(deny)):
        if _type(path) is _bytes:
            path = _bytes.decode(path, "utf-8", "surrogateescape")
        if _type(path) is not _str:
            return False
        real = _resolve(path)
        if real is None:
            return False
        return _longest(real, _allow) > _longest(real, _deny)

    def note(text, _log=log, _len=len):
        if _len(_log) < 50:
            _log.append(text)

    def show(value, _type=type, _str=str, _bytes=bytes, _repr=repr):
        # Never call a method (or a metaclass property) of a learner's object in the hook.
        if _type(value) is _str or _type(value) is _bytes:
            return _repr(value)
        return "<an object that is not a str>"

    def hook(event, args, _denied=_DENIED_EVENTS, _prefixes=_DENIED_PREFIXES, _paths=_PATH_EVENTS,
             _permitted=permitted, _note=note, _show=show, _type=type, _str=str, _int=int,
             _perm=PermissionError, _importerr=ModuleNotFoundError, _runtime=RuntimeError,
             _blocked=blocked_module,
             _write=os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC):
        if _type(event) is not _str:
            return
        if event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if _type(path) is _int:
                return
            writing = (_type(flags) is _int and flags & _write) or (
                _type(mode) is _str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)
            )
            if writing:
                if _type(path) is _str and path == "/dev/null":
                    return
                _note("write " + _show(path))
                raise _perm("keras-decoder grader: writing files is not allowed while grading: " + _show(path))
            if not _permitted(path):
                _note("read " + _show(path))
                raise _perm("keras-decoder grader: reading this file is not allowed while grading: " + _show(path))
            return
        if event == "import":
            name = args[0]
            if _type(name) is not _str or name == _blocked or name.startswith(_blocked + "."):
                _note("import " + _show(name))
                raise _importerr(
                    "keras-decoder grader: " + _show(name) + " cannot be imported while grading. "
                    "Write the function yourself, with NumPy or keras.ops."
                )
            return
        if event in _paths:
            path = args[0]
            if path is None or _type(path) is _int:
                return
            if not _permitted(path):
                _note(event + " " + _show(path))
                raise _perm("keras-decoder grader: listing this folder is not allowed while grading: " + _show(path))
            return
        if event == "sys.addaudithook":
            _note(event)  # only a RuntimeError stops it (silently): no second hook
            raise _runtime("keras-decoder grader: sys.addaudithook is not allowed while grading")
        if event in _denied or event.startswith(_prefixes):
            _note(event)
            raise _perm("keras-decoder grader: " + event + " is not allowed while grading")

    return hook


def _pin_session_packer(shell, json):
    """Make the kernel's message packer use ``json.dumps``/``json.loads`` as they are now."""
    session = getattr(getattr(shell, "kernel", None), "session", None)
    if session is None:
        return
    try:
        from jupyter_client.session import json_default
    except ImportError:
        return
    dumps, loads = json.dumps, json.loads

    def pack(obj):
        return dumps(obj, default=json_default, ensure_ascii=False, allow_nan=False).encode(
            "utf8", errors="surrogateescape"
        )

    def unpack(data):
        return loads(data.decode("utf8", "replace") if isinstance(data, bytes) else data)

    if getattr(session, "packer", "json") == "json":
        session.pack, session.unpack = pack, unpack


def _read_inputs(path, manifest, np):
    """The cases, as ``{name: [(args, kwargs), ...]}``, rebuilt from the npz file."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}

    def value(spec):
        return arrays[spec["array"]] if "array" in spec else spec["value"]

    return {
        name: [
            ([value(a) for a in case["args"]], {k: value(v) for k, v in case["kwargs"].items()})
            for case in cases
        ]
        for name, cases in manifest.items()
    }


def _stub_modules(name, sys, types):
    """Replace the package ``name`` by an empty module, and ``name.grading`` by a silent stub."""

    class _Silent:
        """``ex`` while grading: every method does nothing."""

        def __getattr__(self, attribute):
            return lambda *args, **kwargs: None

    package = types.ModuleType(name, "Stub: not available while grading.")
    grading = types.ModuleType(name + ".grading", "Stub: ex.check() does nothing while grading.")
    grading.load_exercise = lambda *args, **kwargs: _Silent()
    package.grading = grading
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    sys.modules[name] = package
    sys.modules[name + ".grading"] = grading


def _allowed_reads(sys, os, pid):
    """Folders the kernel may read from after lock-down: Python, its packages, the system."""
    import site
    import sysconfig

    paths = set()
    for scheme_path in sysconfig.get_paths().values():
        paths.add(scheme_path)
    for prefix in (sys.prefix, sys.exec_prefix):
        paths.add(prefix)
    for prefix in (sys.base_prefix, sys.base_exec_prefix):
        paths.add(os.path.join(prefix, "lib"))
        paths.add(os.path.join(prefix, "lib64"))
    try:
        paths.update(site.getsitepackages())
        paths.add(site.getusersitepackages())
    except Exception:
        pass
    for name, module in list(sys.modules.items()):
        if "." in name:
            continue  # a submodule lives inside its top-level package, added below
        package_path = getattr(module, "__path__", None)
        if package_path is not None:
            try:
                paths.update(p for p in package_path if isinstance(p, str))
            except TypeError:
                pass
            continue
        file = getattr(module, "__file__", None)
        if isinstance(file, str):
            paths.add(os.path.dirname(file))
    paths.update(
        [
            "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/share", "/usr/local/lib", "/usr/local/lib64",
            "/usr/local/share", "/usr/local/cuda", "/lib", "/lib64", "/etc", "/sys", "/dev",
            f"/proc/{pid}", "/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/proc/sys",
            "/proc/filesystems", "/proc/loadavg", "/proc/version", "/proc/uptime",
        ]
    )
    return sorted(os.path.realpath(p) for p in paths if p and p != "/")


def _data_size(os):
    try:
        with open(f"/proc/{os.getpid()}/status") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _Harness:
    """The kernel-side object the grader's cells call: ``call(name)`` and ``report()``."""

    def __init__(self, cases, namespace, publish, mime, nonce, np, io, base64, time, blocked, convert):
        self._cases, self._ns, self._publish, self._mime, self._nonce = cases, namespace, publish, mime, nonce
        self._np, self._io, self._base64, self._time, self._blocked = np, io, base64, time, blocked
        # Captured now: the learner may replace numpy or keras functions later.
        self._convert, self._asarray, self._save = convert, np.asarray, np.save
        self._array, self._ndarray = np.array, np.ndarray

    def _send(self, payload):
        payload["nonce"] = self._nonce
        self._publish({self._mime: payload})

    def call(self, name):
        """Call the learner's ``name`` on every case; publish plain results."""
        fn = self._ns.get(name)
        if fn is None or not callable(fn):
            self._send({"question": name, "defined": False, "cases": []})
            return
        results, start = [], self._time.perf_counter()
        for args, kwargs in self._cases[name]:
            args = [self._array(a, copy=True) if isinstance(a, self._ndarray) else a for a in args]
            kwargs = {k: self._array(v, copy=True) if isinstance(v, self._ndarray) else v for k, v in kwargs.items()}
            try:
                out = fn(*args, **kwargs)
            except NotImplementedError:
                results.append({"status": "not_implemented"})
                continue
            except KeyboardInterrupt:
                results.append({"status": "timeout"})
                break
            except BaseException as exc:  # noqa: BLE001  (SystemExit too: it is the learner's)
                results.append({"status": "error", "error": describe_exception(exc)})
                continue
            try:
                arr = to_array(out, self._convert, self._asarray)
                buffer = self._io.BytesIO()
                # np.array(order="C") keeps a 0-d result 0-d; ascontiguousarray
                # would turn a scalar answer into shape (1,) and grade it wrong.
                self._save(buffer, self._array(arr, order="C"), allow_pickle=False)
                data = self._base64.b64encode(buffer.getvalue()).decode("ascii")
                results.append({"status": "ok", "npy": data})
            except KeyboardInterrupt:
                results.append({"status": "timeout"})
                break
            except BaseException as exc:  # noqa: BLE001
                results.append({"status": "bad_output", "error": str(exc) if isinstance(exc, TypeError) else describe_exception(exc)})
        seconds = self._time.perf_counter() - start
        self._send({"question": name, "defined": True, "cases": results, "seconds": seconds})

    def report(self):
        """Publish the operations the guard blocked."""
        self._send({"report": True, "blocked": list(self._blocked)})


def setup(params):
    """Prepare the kernel for grading; return the harness object. See the module docstring."""
    import base64
    import io
    import json
    import os
    import sys
    import time
    import types

    import numpy as np

    import keras

    # 1. Initialise the backend with one op.
    keras.ops.convert_to_numpy(keras.ops.softmax(keras.ops.ones((2, 3)), axis=-1))
    from IPython import get_ipython
    from IPython.display import publish_display_data

    # 2. Inputs, kept in memory.
    cases = _read_inputs(params["inputs"], params["manifest"], np)

    # Modules some libraries import lazily: loaded now, while loading is allowed.
    for name in ("ctypes", "ctypes.util", "mmap", "multiprocessing", "subprocess", "socket", "shutil", "tempfile"):
        try:
            __import__(name)
        except Exception:
            pass

    # exit() and quit() would stop the kernel a moment *after* their cell: a death
    # that cannot be told apart from the next cell's. While grading they raise.
    def _no_exit(*args, **kwargs):
        raise SystemExit("exit() and quit() do nothing while grading")

    get_ipython().ask_exit = _no_exit

    # The kernel's messages are JSON: bind its packer to json as it is now, so that a
    # submission that replaces json.dumps breaks only itself, not the channel back.
    _pin_session_packer(get_ipython(), json)

    # 3. keras_decoder is not available to graded code.
    blocked_module = params.get("blocked_module", "keras_decoder")
    _stub_modules(blocked_module, sys, types)

    # 4. Resource limits.
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        data = _data_size(os)
        if params.get("memory_limit") and data is not None:
            limit = data + int(params["memory_limit"])
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass

    # 5. The guard.
    blocked = []
    allow = _allowed_reads(sys, os, os.getpid()) + [os.path.realpath(p) for p in params.get("allow", [])]
    deny = [os.path.realpath(p) for p in params.get("deny", [])] + ["/dev/shm", "/dev/mqueue"]
    sys.addaudithook(_make_guard(allow, deny, blocked_module, blocked))

    return _Harness(
        cases, get_ipython().user_ns, publish_display_data, params["mime"], params["nonce"],
        np, io, base64, time, blocked, keras.ops.convert_to_numpy,
    )
