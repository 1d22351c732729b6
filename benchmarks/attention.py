"""Attention benchmark: ours over Keras's, in one process, on one machine.

Run once per backend (``make bench`` does all three)::

    KERAS_BACKEND=jax python benchmarks/attention.py

Each ratio is our time over the baseline's time, both measured in this
process, interleaved (ours, baseline, ours, ...) so that a busy machine slows
both alike; each time is the median of ``--repeats`` runs after warm-up.
"Compiled" is ``jax.jit`` / ``tf.function(jit_compile=True)``; torch runs
eagerly only (``torch.compile`` on CPU needs a C++ toolchain and minutes of
compilation, so it is left out).

| config | ratio | target |
|---|---|---|
| A: B=8, T=512, H=8, D=64, causal + padding | ``MultiHeadAttention`` / ``keras.layers.MultiHeadAttention`` | <= 1.0 |
| B: B=2, T=2048, H=8, D=64, causal | the same | <= 0.8 tensorflow/jax, <= 1.0 torch |
| A | ``scaled_dot_product_attention`` / ``keras.ops.dot_product_attention`` | <= 1.1 |

GFLOP/s count only the causal half of the attention (and all of the four
projections, for the layers), against a float32 NumPy matmul measured here.
The second table is the measurement behind ``attention._BLOCKED_CAUSAL``:
causal attention by query blocks (``block``) against the whole square
(``fused``), per backend.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from keras_decoder import attention as att  # noqa: E402

BACKEND = keras.backend.backend()
HEADS, HEAD_DIM = 8, 64
WIDTH = HEADS * HEAD_DIM
CONFIGS = {"A": dict(batch=8, length=512, padded=True), "B": dict(batch=2, length=2048,
                                                                   padded=False)}
SWEEP = (0, (128, "fused"), (256, "fused"), (128, "matmul"), (256, "matmul"))
TARGETS = {
    ("A", "layer"): 1.0,
    ("B", "layer"): 1.0 if BACKEND == "torch" else 0.8,
    ("A", "function"): 1.1,
}


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------
def _block(x):
    """Wait for the result (and copy it to NumPy, the same cost for both sides)."""
    while isinstance(x, (tuple, list)):
        x = x[0]
    return ops.convert_to_numpy(x)


MIN_SECONDS = 3.0  # per callable: fast ones get more repeats (less noise)


def measure(fns, repeats, warmup):
    """Median seconds of each ``fns[name]()``, interleaved round-robin.

    At least ``repeats`` rounds, and more (up to 10x) while a callable has run
    for less than ``MIN_SECONDS`` in all: fast cases get more samples.
    """
    first = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            start = time.perf_counter()
            _block(fn())
            first[name] = time.perf_counter() - start
    slowest = max(first.values(), default=0.0) or 1e-3
    repeats = min(10 * repeats, max(repeats, int(MIN_SECONDS / slowest)))
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            _block(fns[name]())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}, repeats


def numpy_gflops(repeats):
    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype("float32")
    a @ a
    ts = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        ts.append(time.perf_counter() - start)
    return 2 * 1024**3 / statistics.median(ts) / 1e9


def attention_flops(batch, length):
    """The causal half of ``q kᵀ`` and ``weights v``."""
    return 2 * batch * HEADS * length * length * HEAD_DIM


def layer_flops(batch, length):
    return attention_flops(batch, length) + 4 * 2 * batch * length * WIDTH * WIDTH


# ---------------------------------------------------------------------------
# Eager and compiled callables.
# ---------------------------------------------------------------------------
def compiler(mode):
    if mode == "eager":
        return lambda fn: fn
    if BACKEND == "jax":
        import jax

        return jax.jit
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # one tf.function per variant: retracing is expected
        return lambda fn: tf.function(fn, jit_compile=True)
    raise ValueError(f"No compiled mode on {BACKEND}")


def layer_call(layer, mode, **kwargs):
    """``() -> layer(x, x, **kwargs)``, compiled with the weights as arguments on JAX."""
    if mode == "compiled" and BACKEND == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        @jax.jit
        def run(trainable, non_trainable, x, mask):
            out, _ = layer.stateless_call(trainable, non_trainable, x, x, attention_mask=mask,
                                          **kwargs)
            return out

        return lambda x, mask: run(trainable, non_trainable, x, mask)
    fn = lambda x, mask: layer(x, x, attention_mask=mask, **kwargs)  # noqa: E731
    return compiler(mode)(fn)


def make_layers(rng):
    ours = att.MultiHeadAttention(HEADS, HEAD_DIM)
    theirs = keras.layers.MultiHeadAttention(HEADS, HEAD_DIM)
    ours.build((None, None, WIDTH), (None, None, WIDTH))
    theirs.build((None, None, WIDTH), (None, None, WIDTH))
    for name in ("query_dense", "key_dense", "value_dense", "output_dense"):
        for w_ours, w_theirs in zip(getattr(ours, name).weights, getattr(theirs, name).weights):
            w_ours.assign(rng.standard_normal(tuple(w_ours.shape)).astype("float32") * 0.05)
            w_theirs.assign(w_ours)
    return ours, theirs


def inputs(rng, batch, length, padded):
    x = ops.convert_to_tensor(rng.standard_normal((batch, length, WIDTH)).astype("float32"))
    if not padded:
        return x, None
    lengths = rng.integers(length // 2, length + 1, size=batch)
    pad = np.arange(length)[None] < lengths[:, None]  # (B, T)
    return x, pad


# ---------------------------------------------------------------------------
# The benchmark.
# ---------------------------------------------------------------------------
def run(repeats, modes):
    rng = np.random.default_rng(0)
    ours, theirs = make_layers(rng)
    rows, sweep = [], []
    for mode in modes:
        warmup = 2 if mode == "compiled" else 1
        compile_ = compiler(mode)
        for name, cfg in CONFIGS.items():
            b, t = cfg["batch"], cfg["length"]
            x, pad = inputs(rng, b, t, cfg["padded"])
            mask = None if pad is None else ops.convert_to_tensor(pad[:, None, :])  # (B, 1, T)
            f_ours = layer_call(ours, mode, use_causal_mask=True)
            f_theirs = layer_call(theirs, mode, use_causal_mask=True)
            times, runs = measure({"ours": lambda: f_ours(x, mask),
                                   "keras": lambda: f_theirs(x, mask)}, repeats, warmup)
            rows.append((mode, name, "layer", times, runs, layer_flops(b, t)))

            # The function, config A only: causal + padding as one boolean mask.
            if name == "A":
                q, k, v = (ops.convert_to_tensor(
                    rng.standard_normal((b, t, HEADS, HEAD_DIM)).astype("float32"))
                    for _ in range(3))
                full = np.tril(np.ones((t, t), bool))[None, None] & pad[:, None, None, :]
                full = ops.convert_to_tensor(full)  # (B, 1, T, T)
                g_ours = compile_(lambda q, k, v, m: att.scaled_dot_product_attention(q, k, v, m))
                g_keras = compile_(lambda q, k, v, m: ops.dot_product_attention(q, k, v, mask=m))
                times, runs = measure({"ours": lambda: g_ours(q, k, v, full),
                                       "keras": lambda: g_keras(q, k, v, full)}, repeats, warmup)
                rows.append((mode, name, "function", times, runs, attention_flops(b, t)))

            # The blocked-path sweep behind attention._BLOCKED_CAUSAL.
            q, k, v = (ops.convert_to_tensor(
                rng.standard_normal((b, t, HEADS, HEAD_DIM)).astype("float32")) for _ in range(3))
            key_mask = None if pad is None else ops.convert_to_tensor(pad[:, None, None, :])
            fns = {}
            for block in SWEEP:
                fn = compile_(lambda q, k, v, block=block: att._attend(
                    q, k, v, mask=key_mask, causal=True, block_size=block))
                fns[block] = lambda fn=fn: fn(q, k, v)
            sweep.append((mode, name, measure(fns, max(3, repeats - 2), warmup)[0]))
    return rows, sweep


def report(rows, sweep, gflops, repeats):
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n### KERAS_BACKEND={BACKEND} (keras {keras.__version__}, {os.cpu_count()} CPUs, "
          f"load average {load:.1f}, median of >= {repeats} runs; NumPy float32 matmul "
          f"{gflops:.0f} GFLOP/s)\n")
    print("| mode | config | ours / baseline | runs | ours ms | baseline ms | ratio | target "
          "| met | ours GFLOP/s | baseline GFLOP/s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for mode, name, what, times, runs, flops in rows:
        ratio = times["ours"] / times["keras"]
        target = TARGETS[(name, what)]
        label = ("`MultiHeadAttention` / `keras.layers.MultiHeadAttention`" if what == "layer"
                 else "`scaled_dot_product_attention` / `keras.ops.dot_product_attention`")
        print(f"| {mode} | {name} | {label} | {runs} | {times['ours'] * 1e3:.0f} | "
              f"{times['keras'] * 1e3:.0f} | {ratio:.2f} | <= {target} | "
              f"{'yes' if ratio <= target else '**no**'} | {flops / times['ours'] / 1e9:.1f} | "
              f"{flops / times['keras'] / 1e9:.1f} |")
    print("\nCausal attention core (`attention._attend`), ms. `whole` = one "
          "`keras.ops.dot_product_attention(is_causal=True)` over the whole square; "
          "`fused 256` = blocks of 256 queries, each a `keras.ops.dot_product_attention`; "
          "`matmul 256` = blocks in the (B, H, T, D) layout with plain matmuls:\n")
    names = ["whole"] + [f"{kernel} {size}" for size, kernel in SWEEP[1:]]
    print("| mode | config | " + " | ".join(names) + " | best |")
    print("|---|---|" + "---:|" * len(names) + "---|")
    for mode, name, times in sweep:
        values = [times[block] for block in SWEEP]
        best = names[int(np.argmin(values))]
        print(f"| {mode} | {name} | " + " | ".join(f"{t * 1e3:.0f}" for t in values)
              + f" | {best} |")
    print(f"\nBlocked causal policy now in use on {BACKEND}: "
          f"{att._BLOCKED_CAUSAL.get(BACKEND)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--modes", default=None,
                        help="comma-separated subset of eager,compiled")
    args = parser.parse_args(argv)
    modes = ["eager"] + (["compiled"] if BACKEND in ("jax", "tensorflow") else [])
    if args.modes:
        modes = [m for m in args.modes.split(",") if m in modes]
    start = time.time()
    gflops = numpy_gflops(args.repeats)
    rows, sweep = run(args.repeats, modes)
    report(rows, sweep, gflops, args.repeats)
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
