"""Train a Seq2SeqTransformer on the generated translation tasks; report held-out exact match.

Run once per backend (``make bench`` does all three)::

    KERAS_BACKEND=jax python benchmarks/train_translation.py            # both tasks
    KERAS_BACKEND=jax python benchmarks/train_translation.py --task dates

Tasks (``keras_decoder.data``):

* ``dates``: a date as people write it, in en/fr/de/zh and four styles, to
  its ISO form. Target: >= 98% exact match on the test split within 3 minutes
  (everything: data, vocabularies, training, decoding) on a 2-core CPU.
* ``number_words``: English number words (1 to 6 digits) to French ones, a
  real translation with reordering. Same budget of steps; no target.

Pipeline: :func:`keras_decoder.data.split` (no source shared between
splits), WordPiece source vocabularies (:func:`~keras_decoder.text.train_wordpiece_vocab`),
character vocabularies for dates, :func:`~keras_decoder.text.seq2seq_dataset`,
:func:`~keras_decoder.training.masked_loss`, and greedy decoding with
:func:`keras_decoder.generation.generate` (KV cache, encoder run once).

Exact match compares the detokenized output with the normalized target.
Tokens/s counts the non-padded source and target tokens that training read,
divided by the time in ``fit``. ``cpu s`` is this process's CPU time: on a
shared machine the wall time also depends on the load (``load``: the 1-minute
load average when the task ends).
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_decoder import data, generation  # noqa: E402
from keras_decoder.models import Seq2SeqTransformer  # noqa: E402
from keras_decoder.text import RESERVED_TOKENS, Tokenizer, seq2seq_dataset, train_wordpiece_vocab  # noqa: E402
from keras_decoder.training import MaskedAccuracy, masked_loss  # noqa: E402

BACKEND = keras.backend.backend()
TASKS = {
    # pairs, source vocabulary, max tokens, epochs, model sizes
    "dates": dict(pairs=24_000, source_vocab=None, max_length=32, epochs=3,
                  model=dict(dim=64, num_heads=4, ff_dim=256, num_encoder_layers=2,
                             num_decoder_layers=2)),
    "number_words": dict(pairs=24_000, source_vocab=2_000, max_length=32, epochs=3,
                         model=dict(dim=64, num_heads=4, ff_dim=256, num_encoder_layers=2,
                                    num_decoder_layers=2)),
}
BATCH_SIZE = 64


def _char_vocab(texts):
    """Reserved tokens, then every character, as a word start and as ``##`` continuation."""
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    return list(RESERVED_TOKENS) + chars + ["##" + c for c in chars]


def _tokenizers(task, train):
    sources, targets = [s for s, _ in train], [t for _, t in train]
    if task == "dates":
        # One token per character: "27/02/1971" and "1998-03-03" are read and
        # written digit by digit, which generalizes to days never seen. (A
        # learned WordPiece vocabulary keeps whole numeric dates as tokens.)
        source = Tokenizer(_char_vocab(sources))
        target = Tokenizer(_char_vocab(targets))
    else:
        source = Tokenizer(train_wordpiece_vocab(sources, TASKS[task]["source_vocab"]))
        target = Tokenizer(train_wordpiece_vocab(targets, 2_000))
    return source, target


def _pad(rows, length):
    out = np.zeros((len(rows), length), "int32")
    for i, row in enumerate(rows):
        out[i, : len(row)] = row[:length]
    return out


def exact_match(model, pairs, source_tok, target_tok, max_length, batch_size=256):
    """Greedy decoding of every source; share of outputs equal to the normalized target."""
    right, examples = 0, []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        n = len(chunk)
        rows = source_tok.tokenize([s for s, _ in chunk]).to_list()
        source = _pad(rows + [[]] * (batch_size - n), max_length)  # one shape: one compile
        start = np.full((batch_size, 1), target_tok.start_id, "int32")
        tokens = generation.generate(model, start, max_new_tokens=max_length - 1,
                                     stop_ids=target_tok.end_id, pad_id=target_tok.pad_id,
                                     encoder_input_ids=source)
        outputs = target_tok.detokenize(np.asarray(tokens)[:n])
        wanted = target_tok.normalize([t for _, t in chunk])
        right += sum(o == w for o, w in zip(outputs, wanted))
        examples += [(s, o, w) for (s, _), o, w in zip(chunk, outputs, wanted) if o != w][:3]
    return right / len(pairs), examples[:3]


def run(task, seed=0, verbose=0):
    cfg = TASKS[task]
    keras.utils.set_random_seed(seed)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    pairs = (data.dates(cfg["pairs"], seed=seed) if task == "dates"
             else data.number_words(cfg["pairs"], "en", "fr", seed=seed))
    train, _, test = data.split(pairs, (0.9, 0.05, 0.05), seed=seed)
    source_tok, target_tok = _tokenizers(task, train)
    dataset = seq2seq_dataset(train, source_tok, target_tok, BATCH_SIZE, cfg["max_length"],
                              seed=seed)
    tokens_read = 0
    for inputs, _, weight in dataset:
        tokens_read += int(np.sum(inputs["encoder_input_ids"].numpy() != 0) + np.sum(weight))
    model = Seq2SeqTransformer(source_tok.vocab_size, target_tok.vocab_size,
                               max_length=cfg["max_length"], **cfg["model"])
    steps = cfg["epochs"] * int(dataset.cardinality())
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps, alpha=0.05, warmup_target=2e-3, warmup_steps=steps // 10)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01),
                  loss=masked_loss(), weighted_metrics=[MaskedAccuracy()],
                  jit_compile=BACKEND != "torch")  # torch.compile on CPU: minutes; eager
    fit0 = time.perf_counter()
    history = model.fit(dataset, epochs=cfg["epochs"], verbose=verbose)
    fit_s = time.perf_counter() - fit0
    accuracy, errors = exact_match(model, test, source_tok, target_tok, cfg["max_length"])
    return dict(task=task, backend=BACKEND, train=len(train), test=len(test),
                params=model.count_params(), exact_match=accuracy,
                token_accuracy=history.history["masked_accuracy"][-1],
                wall_s=time.perf_counter() - wall0, fit_s=fit_s,
                cpu_s=time.process_time() - cpu0,
                tokens_per_s=tokens_read * cfg["epochs"] / fit_s,
                load=os.getloadavg()[0], errors=errors)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), action="append")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=0)
    args = parser.parse_args(argv)
    print("| task | backend | test pairs | params | exact match | wall s | fit s | cpu s "
          "| tokens/s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task in args.task or ("dates", "number_words"):
        r = run(task, args.seed, args.verbose)
        print(f"| {r['task']} | {r['backend']} | {r['test']} | {r['params'] / 1e6:.2f}M "
              f"| {100 * r['exact_match']:.1f}% | {r['wall_s']:.0f} | {r['fit_s']:.0f} "
              f"| {r['cpu_s']:.0f} | {r['tokens_per_s']:,.0f} | {r['load']:.1f} |", flush=True)
        for source, output, wanted in r["errors"]:
            print(f"    e.g. {source!r} -> {output!r}, expected {wanted!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
