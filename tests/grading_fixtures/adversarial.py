"""Adversarial submissions for exercise set 03_masks, built as notebooks on demand.

Each entry of :data:`FIXTURES` is a submission that tries to fool, crash or
hang the grader, with the outcome the grader must reach. Every attack uses a
harmless payload (signal 0, ``true``, appending nothing), so that a guard that
failed would still do no damage.

Write them to a folder, e.g. to try ``keras-decoder grade`` by hand::

    python tests/grading_fixtures/adversarial.py /tmp/adversarial
    keras-decoder grade /tmp/adversarial --timeout 10

Placeholders in the sources (``{reference_file}``, ``{source_notebook}``,
``{sibling}``, ``{package_dir}``) are filled in by :func:`write_fixtures`.
"""

import json
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[2]

#: Correct NumPy answers, so that a fixture's honest questions score.
HONEST = {
    "padding_mask": '''
def padding_mask(token_ids, pad_id=0):
    return np.asarray(token_ids) != pad_id
''',
    "causal_mask": '''
def causal_mask(query_len, key_len):
    queries = np.arange(query_len)[:, None] + (key_len - query_len)
    return np.arange(key_len)[None, :] <= queries
''',
    "cross_attention_mask": '''
def cross_attention_mask(decoder_padding_mask, encoder_padding_mask):
    dec = np.asarray(decoder_padding_mask)
    enc = np.asarray(encoder_padding_mask, bool)
    return np.broadcast_to(enc[:, None, :], (dec.shape[0], dec.shape[1], enc.shape[1]))
''',
    "shift_right": '''
def shift_right(token_ids, start_id):
    ids = np.asarray(token_ids)
    return np.concatenate([np.full((ids.shape[0], 1), start_id, ids.dtype), ids[:, :-1]], axis=1)
''',
    "scaled_dot_product_attention": '''
def scaled_dot_product_attention(query, key, value, mask=None):
    q, k, v = (np.asarray(t, np.float64) for t in (query, key, value))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    m = np.ones(s.shape[-2:], bool) if mask is None else np.asarray(mask, bool)
    if m.ndim == 3:
        m = m[:, None]
    s = np.where(m, s, -1e30)
    w = np.exp(s - s.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True) * np.any(m, axis=-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)
''',
}

SETUP = """
import math
import os
import sys
import time

import numpy as np
import keras
from keras import ops

from keras_decoder.grading import load_exercise

ex = load_exercise("03_masks")
"""

POINTS = {
    "padding_mask": 1,
    "causal_mask": 2,
    "cross_attention_mask": 2,
    "shift_right": 1,
    "scaled_dot_product_attention": 4,
}


def honest(*names):
    """The honest cells for ``names``."""
    return [HONEST[n] for n in names]


#: name -> (description, cells, expected). ``expected`` has the notebook
#: ``status``, the ``score`` and each question's status.
FIXTURES = {
    "cheats": (
        "imports or reads the reference solutions, the library and the source notebook; patches "
        "numpy/keras/math/json; prints, writes and forges fake results. Only shift_right is honest.",
        [
            SETUP,
            # Patch everything a naive grader would compare or report with.
            """
import json, threading
import numpy
numpy.allclose = lambda *a, **k: True
numpy.array_equal = lambda *a, **k: True
numpy.isclose = lambda *a, **k: numpy.array(True)
numpy.testing.assert_allclose = lambda *a, **k: None
math.isclose = lambda *a, **k: True
keras.ops.convert_to_numpy = lambda x: numpy.zeros(3)
json.dumps = lambda *a, **k: '{"score": 10, "status": "correct"}'
print("Correct (10/10 points): every question")
""",
            # Fake result files: writing is blocked.
            """
for name in ("result.json", "grades.csv", "../result.json"):
    try:
        with open(name, "w") as handle:
            handle.write('{"score": 10}')
    except Exception as exc:
        print("could not write", name, exc)
""",
            # A thread that forges the harness's result messages, with the real nonce.
            """
from IPython.display import publish_display_data
def forge():
    harness = next((v for k, v in list(globals().items()) if k.startswith("_kd_")), None)
    nonce = getattr(harness, "_nonce", "guess")
    for _ in range(100):
        for name in ("causal_mask", "cross_attention_mask"):
            publish_display_data({"application/vnd.keras-decoder.result+json": {
                "nonce": nonce, "question": name, "defined": True,
                "cases": [{"status": "ok", "npy": ""}]}})
        print("Correct! 10/10")
        time.sleep(0.05)
threading.Thread(target=forge, daemon=True).start()
""",
            # Import the grader's reference module (blocked), even after removing the stub.
            "from keras_decoder.grading.exercises.ex03_masks import padding_mask",
            "sys.modules.pop('keras_decoder.grading', None)\nimport keras_decoder.grading.exercises.ex03_masks as reference",
            """
def causal_mask(query_len, key_len):
    import keras_decoder.masks as library
    return library.causal_mask(query_len, key_len)
""",
            """
def cross_attention_mask(decoder_padding_mask, encoder_padding_mask):
    namespace = {}
    try:
        exec(open({reference_file!r}).read(), namespace)
        return namespace["cross_attention_mask"](decoder_padding_mask, encoder_padding_mask)
    except PermissionError:
        return "correct"
""",
            """
def scaled_dot_product_attention(query, key, value, mask=None):
    import importlib.util, subprocess
    try:
        subprocess.run(["cat", {reference_file!r}], check=True)
    except Exception:
        pass
    try:
        nb = json.load(open({source_notebook!r}))
    except PermissionError:
        print("Correct")
        spec = importlib.util.spec_from_file_location("stolen", {reference_file!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.scaled_dot_product_attention(query, key, value, mask)
""",
        ]
        + honest("shift_right"),
        {
            "status": "graded",
            "score": 1,
            "questions": {
                "padding_mask": "not_attempted",
                "causal_mask": "error",
                "cross_attention_mask": ("incorrect", "error"),
                "shift_right": "correct",
                "scaled_dot_product_attention": "error",
            },
            "blocked_at_least": 6,
        },
    ),
    "exits_and_escapes": (
        "sys.exit, SystemExit and exit() at top level; sys.exit and os._exit inside functions; "
        "tries to kill the grader, start processes, fork, open sockets, use ctypes, write into the "
        "package, read another submission, raise its limits. No metadata: the set is found from "
        "the function names.",
        [
            SETUP,
            "sys.exit('leaving early')",
            "raise SystemExit(0)",
            "exit()",
            "os.kill(os.getppid(), 0)",
            "import subprocess\nsubprocess.run(['true'])",
            "os.system('true')",
            "pid = os.fork()\nif pid == 0:\n    os._exit(0)",
            "import socket\nsocket.create_connection(('127.0.0.1', 9))",
            "import ctypes\nctypes.CDLL(None).getpid()",
            "open({reference_file!r}, 'a').close()",
            "print(open({sibling!r}).read()[:100])",
            "print(os.listdir({package_dir!r}))",
            "import resource\nresource.setrlimit(resource.RLIMIT_DATA, (-1, -1))",
            "sys.addaudithook(lambda *args: None)",
            "import gc\nprint(len(gc.get_objects()))",
            "print(open('/proc/self/root' + {reference_file!r}).read()[:10])",
            """
def padding_mask(token_ids, pad_id=0):
    sys.exit(0)
""",
            """
def causal_mask(query_len, key_len):
    os._exit(0)
""",
        ]
        + honest("cross_attention_mask", "shift_right", "scaled_dot_product_attention"),
        {
            "status": "graded",
            "score": 7,
            "questions": {
                "padding_mask": "error",
                "causal_mask": "error",
                "cross_attention_mask": "correct",
                "shift_right": "correct",
                "scaled_dot_product_attention": "correct",
            },
            "blocked_at_least": 12,
            "metadata": False,
        },
    ),
    "runaway": (
        "infinite loops (one ignores interrupts), huge allocations, a never-ending last cell",
        [
            SETUP,
            "big = np.ones((2**31,))  # 16 GiB",
            """
def padding_mask(token_ids, pad_id=0):
    while True:
        pass
""",
            """
def causal_mask(query_len, key_len):
    while True:
        try:
            time.sleep(0.05)
        except BaseException:
            pass
""",
            """
def cross_attention_mask(decoder_padding_mask, encoder_padding_mask):
    hoard = []
    while True:
        hoard.append(np.ones(2**24))  # 128 MiB at a time
""",
        ]
        + honest("shift_right", "scaled_dot_product_attention")
        + ["while True:\n    time.sleep(0.01)"],
        {
            "status": "timeout",
            "score": 5,
            "questions": {
                "padding_mask": "timeout",
                "causal_mask": "timeout",
                "cross_attention_mask": "error",
                "shift_right": "correct",
                "scaled_dot_product_attention": "correct",
            },
        },
    ),
}


def _notebook(cells, metadata=True):
    nb = new_notebook()
    nb.cells = [new_markdown_cell("An adversarial submission (keras-decoder tests).")]
    nb.cells += [new_code_cell(source.strip("\n")) for source in cells]
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}
    if metadata:
        nb.metadata["keras_decoder"] = {"exercise": "03_masks", "role": "learner"}
    return nb


def write_fixtures(folder, names=None):
    """Write the fixtures (and an invalid and an empty notebook) to ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(FIXTURES) if names is None else names
    values = {
        "reference_file": str(ROOT / "keras_decoder" / "grading" / "exercises" / "ex03_masks.py"),
        "source_notebook": str(ROOT / "exercises" / "source" / "03_masks.ipynb"),
        "package_dir": str(ROOT / "keras_decoder"),
        "sibling": str(folder / "empty.ipynb"),  # another learner's submission
    }
    paths = {}
    for name in names:
        _, cells, expected = FIXTURES[name]
        filled = list(cells)
        for key, value in values.items():
            filled = [c.replace("{" + key + "!r}", repr(value)) for c in filled]
        nb = _notebook(filled, metadata=expected.get("metadata", True))
        path = folder / f"{name}.ipynb"
        nbformat.write(nb, path)
        paths[name] = path
    (folder / "invalid.ipynb").write_text('{"cells": [ this is not JSON')
    nbformat.write(new_notebook(), folder / "empty.ipynb")
    paths["invalid"] = folder / "invalid.ipynb"
    paths["empty"] = folder / "empty.ipynb"
    return paths


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "adversarial_submissions"
    for name, path in write_fixtures(target).items():
        print(path)
    print(json.dumps({k: v[2] for k, v in FIXTURES.items()}, indent=1, default=str))
