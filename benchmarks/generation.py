"""Generation benchmark: cached over uncached, and ours over KerasHub's GPT-2.

Run once per backend (``make bench`` does all three)::

    KERAS_BACKEND=jax python benchmarks/generation.py

Model: ``DecoderOnlyLM`` with 4 layers, dim 256, 8 heads, ff 1024, vocabulary
1000, learned positions, random weights. Batch 4, prompt 32 tokens, 256 new
tokens, greedy, no stop id (every run makes all 256 tokens).

* **cached**: :func:`keras_decoder.generation.generate` (KV cache, the whole
  decode compiled once: XLA on TensorFlow, ``jax.jit`` on JAX, eager
  ``inference_mode`` on torch, sublayers called directly, the cache written
  in place: see ``keras_decoder/_calls.py``).
* **uncached**: the same greedy decode without a cache. Each step runs the
  whole model over the static ``(4, 288)`` buffer (prompt, tokens so far,
  padding) and takes the argmax at the newest position: one compiled forward
  pass (``jax.jit`` of ``stateless_call``, ``tf.function(jit_compile=True)``,
  torch ``inference_mode``) called from a Python loop. Every step costs the
  same, so its tokens/s is measured over the first ``--uncached-steps`` steps.
  Its tokens equal the cached ones (checked).
* **KerasHub**: ``keras_hub.models.GPT2CausalLM`` on a ``GPT2Backbone`` with the
  same dimensions (random weights, ``preprocessor=None``), compiled with
  ``sampler="greedy"``, ``generate`` on ``{"token_ids", "padding_mask"}`` of
  length 288 with ``stop_token_ids=None``. Offline: nothing is downloaded.

On torch the benchmark runs with ``--torch-threads 1`` (both sides) by default: on a busy
2-core machine, torch's two OpenMP threads fight the other processes and tiny
ops get up to 10x slower, which swamps the comparison.

The runs are interleaved (ours, KerasHub, ours, ...) in one process, so that a
busy machine slows both alike; each time is the median of ``--repeats`` runs
after one warm-up (the compilation). Tokens/s count new tokens: 4 × 256 per run.

| ratio | target |
|---|---|
| cached tokens/s ÷ uncached tokens/s | ≥ 8 |
| ours ÷ ``GPT2CausalLM`` | ≥ 1.0 tensorflow and jax, ≥ 1.5 torch |
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

from keras_decoder.generation import generate  # noqa: E402
from keras_decoder.models import DecoderOnlyLM  # noqa: E402

BACKEND = keras.backend.backend()
VOCAB, DIM, HEADS, FF, LAYERS = 1000, 256, 8, 1024, 4
BATCH, PROMPT, NEW = 4, 32, 256
MAX_LENGTH = 512  # position tables of both models; decoding uses PROMPT + NEW = 288
TARGETS = {"cached / uncached": 8.0,
           "ours / GPT2CausalLM": 1.5 if BACKEND == "torch" else 1.0}


def _ours():
    keras.utils.set_random_seed(0)
    model = DecoderOnlyLM(VOCAB, MAX_LENGTH, DIM, HEADS, FF, LAYERS, position="learned")
    model(np.ones((1, 1), "int32"))
    return model


def _keras_hub():
    import keras_hub

    keras.utils.set_random_seed(1)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, hidden_dim=DIM,
        intermediate_dim=FF, max_sequence_length=MAX_LENGTH)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    causal_lm.compile(sampler="greedy")
    return causal_lm


def _forward(model):
    """``(ids (B, T), start (B,)) -> logits (B, T, V)``, compiled once per shape."""
    if BACKEND == "jax":
        import jax

        @jax.jit
        def run(trainable, non_trainable, ids, start):
            logits, _ = model.stateless_call(trainable, non_trainable, ids, start_index=start)
            return logits

        return lambda ids, start: run([v.value for v in model.trainable_variables],
                                      [v.value for v in model.non_trainable_variables],
                                      ids, start)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda ids, start: model(ids, start_index=start), jit_compile=True)
    return lambda ids, start: model(ids, start_index=start)


def _inference():
    if BACKEND == "torch":
        import torch

        return torch.inference_mode()
    import contextlib

    return contextlib.nullcontext()


def uncached_greedy(forward, prompt, steps):
    """Greedy without a cache: a full forward pass over the static buffer per token."""
    buffer = np.zeros((BATCH, PROMPT + NEW), "int32")
    buffer[:, :PROMPT] = prompt
    start = ops.convert_to_tensor(np.zeros((BATCH,), "int32"))
    with _inference():
        for step in range(steps):
            logits = forward(ops.convert_to_tensor(buffer), start)  # (B, 288, V)
            last = ops.convert_to_numpy(logits[:, PROMPT + step - 1])  # (B, V)
            last[:, 0] = -np.inf  # pad_id is never generated (as in `generate`)
            buffer[:, PROMPT + step] = last.argmax(-1)
    return buffer[:, PROMPT:PROMPT + steps]


def measure(fns, repeats):
    """Median seconds of each ``fns[name]()``, interleaved, after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(repeats, uncached_steps):
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, VOCAB, (BATCH, PROMPT)).astype("int32")
    model, causal_lm = _ours(), _keras_hub()
    token_ids = np.zeros((BATCH, PROMPT + NEW), "int32")
    token_ids[:, :PROMPT] = prompt
    hub_inputs = {"token_ids": ops.convert_to_tensor(token_ids),
                  "padding_mask": ops.convert_to_tensor(token_ids != 0)}

    def ours():
        return generate(model, prompt, max_new_tokens=NEW)

    def hub():
        return causal_lm.generate(hub_inputs, stop_token_ids=None)

    times = measure({"ours": ours, "keras_hub": hub}, repeats)
    cached_tokens = ours()

    forward = _forward(model)
    uncached_greedy(forward, prompt, 2)  # compile
    runs = []
    for _ in range(max(1, repeats // 2)):
        start = time.perf_counter()
        uncached = uncached_greedy(forward, prompt, uncached_steps)
        runs.append(time.perf_counter() - start)
    same = bool(np.array_equal(uncached, cached_tokens[:, :uncached_steps]))
    return {
        "cached": BATCH * NEW / times["ours"],
        "uncached": BATCH * uncached_steps / statistics.median(runs),
        "keras_hub": BATCH * NEW / times["keras_hub"],
        "same_tokens": same,
    }


def _threads():
    if BACKEND != "torch":
        return ""
    import torch

    return f", torch threads {torch.get_num_threads()}"


def report(result, repeats, seconds):
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    ratios = {"cached / uncached": result["cached"] / result["uncached"],
              "ours / GPT2CausalLM": result["cached"] / result["keras_hub"]}
    met = all(ratios[k] >= TARGETS[k] for k in TARGETS)
    print(f"\n### KERAS_BACKEND={BACKEND} (keras {keras.__version__}, {os.cpu_count()} CPUs, "
          f"load average {load} (1/5/15 min), median of {repeats} runs, {seconds:.0f} s"
          f"{_threads()})\n")
    print("| backend | cached tok/s | uncached tok/s | GPT2CausalLM tok/s | cached / uncached "
          "(≥ 8) | ours / GPT2CausalLM (≥ " + f"{TARGETS['ours / GPT2CausalLM']}) | met |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print(f"| {BACKEND} | {result['cached']:.0f} | {result['uncached']:.0f} | "
          f"{result['keras_hub']:.0f} | {ratios['cached / uncached']:.1f} | "
          f"{ratios['ours / GPT2CausalLM']:.2f} | {'yes' if met else '**no**'} |")
    print(f"\ncached tokens == uncached tokens: {result['same_tokens']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--uncached-steps", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args(argv)
    if BACKEND == "torch" and args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    start = time.time()
    result = run(args.repeats, args.uncached_steps)
    report(result, args.repeats, time.time() - start)


if __name__ == "__main__":
    main()
