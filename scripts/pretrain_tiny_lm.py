"""Pretrain the tiny language model shipped as ``keras_decoder.pretrained("tiny-lm")``.

The corpus is generated (no downloads), one line per document, each starting
with a language tag:

* number words, alone: ``<en> three hundred and forty-five`` or
  ``<fr> trois cent quarante-cinq``;
* number words with their digits, in both orders:
  ``<en> three hundred and forty-five = 345``, ``<fr> 345 = trois cent
  quarante-cinq``;
* written dates: ``<en> tuesday, march 3, 1998``, ``<fr> 3 mars 1998``.

No line ever holds two languages, so the model knows English and French
numbers but has never translated one into the other: fine-tuning it on
``"<en> one hundred and twelve <fr>" -> "cent douze"`` (lesson 11,
``tests/test_finetune_demo.py``) teaches a new task, not one it already solves.

The run is reproducible from ``--seed`` on one backend (JAX by default, the
fastest on a CPU). It writes, under ``keras_decoder/checkpoints/``:

* ``tiny_lm.keras``: the model, without optimizer state;
* ``tiny_lm_vocab.txt``: the WordPiece vocabulary (:class:`keras_decoder.text.Tokenizer`);
* ``tiny_lm_reference_ids.npy`` / ``tiny_lm_reference_logits.npy``: a fixed
  input and its logits, which ``tests/test_pretrained.py`` compares on every
  backend.

Usage::

    KERAS_BACKEND=jax python scripts/pretrain_tiny_lm.py

The shipped checkpoint came from this command (seed 0, 4 epochs of 624
batches, final loss 1.36): 13 minutes on the shared 2-core machine at a load
average of about 8; a few minutes on an idle one. Its vocabulary has 993
tokens and the model 627,584 parameters.
"""

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_decoder import data, training  # noqa: E402
from keras_decoder.models import DecoderOnlyLM  # noqa: E402
from keras_decoder.text import Tokenizer, train_wordpiece_vocab  # noqa: E402

CHECKPOINTS = Path(__file__).resolve().parents[1] / "keras_decoder" / "checkpoints"
LANGUAGES = ("en", "fr")
MAX_NUMBER = 999  # numbers 0..MAX_NUMBER (see _number)
CONFIG = dict(max_length=32, dim=128, num_heads=4, ff_dim=384, num_layers=3,
              position="learned", tie_embeddings=True, dropout=0.0)
WIDTHS = (8, 12, 16, 24, 31)  # padded input lengths (one compiled step each)
REFERENCE_TEXTS = ("<en> one hundred and twelve", "<fr> 345 = trois cent quarante-cinq")


def _number(rng):
    """0..9 (10% of the draws), 10..99 (30%), 100..999 (60%)."""
    digits = rng.choices((1, 2, 3), weights=(0.1, 0.3, 0.6))[0]
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), min(10**digits - 1, MAX_NUMBER))


def corpus(n, seed=0):
    """``n`` tagged monolingual lines (see the module docstring)."""
    from num2words import num2words

    rng = random.Random(seed)
    date_lines = {language: iter(data.dates(n, languages=(language,), seed=seed + k))
                  for k, language in enumerate(LANGUAGES)}
    lines = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.1:  # a date, as a person writes it
            language = rng.choice(LANGUAGES)
            lines.append(f"<{language}> {next(date_lines[language])[0]}")
            continue
        language = rng.choice(LANGUAGES)
        number = _number(rng)
        words = num2words(number, lang=language)
        if kind < 0.4:
            lines.append(f"<{language}> {words}")
        elif kind < 0.7:
            lines.append(f"<{language}> {words} = {number}")
        else:
            lines.append(f"<{language}> {number} = {words}")
    return lines


def encode(lines, tokenizer, length):
    """``[START] line [END]`` padded to ``length + 1``: (inputs, labels, weights)."""
    rows = tokenizer.tokenize(lines, add_start_end=True).to_list()
    rows = [r for r in rows if len(r) <= length + 1]
    ids = np.full((len(rows), length + 1), tokenizer.pad_id, dtype="int32")
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    inputs, labels = ids[:, :-1], ids[:, 1:]
    return inputs, labels, (labels != tokenizer.pad_id).astype("float32")


class Buckets(keras.utils.PyDataset):
    """Batches of lines of similar length, padded to a few fixed widths.

    Most lines are short (a number is ~8 tokens), so padding every row to
    ``max_length`` would waste most of the compute. Each width is one compiled
    train step. Batches are reshuffled every epoch, reproducibly.
    """

    def __init__(self, lines, tokenizer, widths, batch_size, seed=0):
        super().__init__()
        rows = tokenizer.tokenize(lines, add_start_end=True).to_list()
        self.groups = {}
        for row in rows:
            width = next((w for w in widths if len(row) <= w + 1), None)
            if width is not None:  # longer lines are dropped
                self.groups.setdefault(width, []).append(row)
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def on_epoch_end(self):
        self.batches = []
        for width, rows in sorted(self.groups.items()):
            order = self.rng.permutation(len(rows))
            for i in range(0, len(rows) - self.batch_size + 1, self.batch_size):
                self.batches.append((width, [rows[j] for j in order[i:i + self.batch_size]]))
        self.rng.shuffle(self.batches)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        width, rows = self.batches[index]
        ids = np.full((len(rows), width + 1), self.tokenizer.pad_id, dtype="int32")
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        labels = ids[:, 1:]
        return ids[:, :-1], labels, (labels != self.tokenizer.pad_id).astype("float32")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lines", type=int, default=40_000)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=CHECKPOINTS)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    start = time.perf_counter()
    lines = corpus(args.lines, seed=args.seed)
    vocab = train_wordpiece_vocab(lines, args.vocab_size)
    tokenizer = Tokenizer(vocab)
    batches = Buckets(lines, tokenizer, WIDTHS, args.batch_size, seed=args.seed)
    print(f"corpus: {len(lines)} lines, {len(batches)} batches, vocabulary {len(vocab)}; "
          f"e.g. {lines[:3]}")

    model = DecoderOnlyLM(vocab_size=len(vocab), pad_id=tokenizer.pad_id, **CONFIG)
    sample = batches[0][0][:2]
    model(sample)
    print(f"parameters: {model.count_params():,}")
    steps = args.epochs * len(batches)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, steps, alpha=0.05, warmup_target=2e-3, warmup_steps=min(200, steps // 10))
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.01),
                  loss=training.masked_loss(), weighted_metrics=[], jit_compile=True)
    model.fit(batches, epochs=args.epochs, verbose=2)

    args.out.mkdir(parents=True, exist_ok=True)
    # Save a fresh, uncompiled copy: no optimizer state in the shipped file.
    shipped = DecoderOnlyLM.from_config(model.get_config())
    shipped(sample)
    shipped.set_weights(model.get_weights())
    shipped.save(args.out / "tiny_lm.keras")
    tokenizer.save(args.out / "tiny_lm_vocab.txt")
    ref_ids, _, _ = encode(list(REFERENCE_TEXTS), tokenizer, 16)
    ref_logits = keras.ops.convert_to_numpy(shipped(ref_ids))
    np.save(args.out / "tiny_lm_reference_ids.npy", ref_ids)
    np.save(args.out / "tiny_lm_reference_logits.npy", ref_logits.astype("float32"))
    size = sum(p.stat().st_size for p in args.out.glob("tiny_lm*"))
    print(f"saved to {args.out} ({size / 1e6:.2f} MB) in {time.perf_counter() - start:.0f} s "
          f"on {keras.backend.backend()}")


if __name__ == "__main__":
    main()
