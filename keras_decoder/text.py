"""Tokenizers and ``tf.data`` pipelines, with tensorflow-text.

This is one of the two modules allowed to import TensorFlow (with
``data.py``): Keras 3 ``fit`` accepts a ``tf.data.Dataset`` on every backend,
so the same pipeline feeds TensorFlow, JAX and PyTorch models.

Tokenization is WordPiece, applied to each whitespace-separated word, so that
it is lossless: ``detokenize(tokenize(text)) == normalize(text)``, where
:meth:`Tokenizer.normalize` only case-folds (if ``lower_case``), applies
Unicode NFC and collapses runs of whitespace. Accents and punctuation are kept:
"zwölf" stays "zwölf" and "1998-03-03" stays "1998-03-03".

Reserved tokens, and what they are for:

* ``[PAD]`` (id 0): fills short rows; masked as a key and dropped from the loss;
* ``[UNK]``: a character never seen when the vocabulary was learned;
* ``[START]``: the first decoder input (BOS);
* ``[END]``: the last label (EOS); generation stops when it is emitted.
"""

import collections
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text
from tensorflow_text.tools.wordpiece_vocab import wordpiece_tokenizer_learner_lib as _learner

from keras_decoder.inputs import teacher_forcing

__all__ = [
    "RESERVED_TOKENS",
    "train_wordpiece_vocab",
    "Tokenizer",
    "seq2seq_dataset",
    "lm_dataset",
]

RESERVED_TOKENS = ("[PAD]", "[UNK]", "[START]", "[END]")


def _normalize(texts, lower_case):
    """Case fold (optional), NFC, collapse whitespace: a ``tf.string`` tensor."""
    texts = tf.convert_to_tensor(texts, dtype=tf.string)
    if lower_case:
        texts = tf_text.case_fold_utf8(texts)
    texts = tf_text.normalize_utf8(texts, "NFC")
    texts = tf.strings.regex_replace(texts, r"\s+", " ")
    return tf.strings.strip(texts)


def _words(texts, lower_case):
    return tf.strings.split(_normalize(texts, lower_case))  # ragged (N, words)


def train_wordpiece_vocab(texts, vocab_size, reserved_tokens=RESERVED_TOKENS, lower_case=True):
    """Learn a WordPiece vocabulary with ``tensorflow_text.tools.wordpiece_vocab``.

    Words are the whitespace-separated pieces of the normalized texts. Every
    character seen is in the vocabulary, both as a word start and as a
    ``##`` continuation, so that any text made of seen characters tokenizes
    without ``[UNK]``.

    Args:
        texts: an iterable of strings.
        vocab_size: the largest vocabulary size wanted (reserved tokens
            included); the result may be somewhat smaller.
        reserved_tokens: tokens placed first, in order: ``[PAD]`` gets id 0.
        lower_case: case-fold before counting.

    Returns:
        A list of token strings.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("Expected at least one text to learn a vocabulary from. Received: 0 texts")
    if vocab_size <= len(reserved_tokens):
        raise ValueError(
            f"Expected vocab_size > {len(reserved_tokens)} reserved tokens. "
            f"Received: vocab_size={vocab_size}"
        )
    counts = collections.Counter()
    for row in _words(texts, lower_case).to_list():
        counts.update(w.decode("utf-8") for w in row)
    # The learner adds every character (twice: as a word start and as "##"
    # continuation) on top of the word pieces it picks, so its result can
    # exceed the target. Ask again for fewer pieces until it fits.
    alphabet = sorted({c for word in counts for c in word})
    target = vocab_size
    for _ in range(4):
        vocab = _learner.learn(
            counts,
            vocab_size=target,
            reserved_tokens=list(reserved_tokens),
            lower_thresh=1,
            upper_thresh=max(counts.values()) + 1,
            max_unique_chars=10_000,
            # Candidate pieces longer than this are not considered: long words
            # (German number words run to 60 characters) make the search
            # quadratic and slow, and are better learned as several pieces.
            max_token_length=12,
            num_iterations=3,
        )
        # Words longer than max_token_length were left out of the counts;
        # their characters must still be tokens, or they would become [UNK].
        known = set(vocab)
        vocab = list(vocab) + [t for c in alphabet for t in (c, "##" + c) if t not in known]
        if len(vocab) <= vocab_size:
            return list(vocab)
        target -= len(vocab) - vocab_size
        if target <= len(reserved_tokens):
            break
    raise ValueError(
        f"Expected a vocab_size that holds every character of the texts. "
        f"Received: vocab_size={vocab_size}; the smallest vocabulary found has {len(vocab)} tokens"
    )


class Tokenizer:
    """WordPiece tokenizer (``tensorflow_text.FastWordpieceTokenizer``).

    Args:
        vocab: a list of tokens, or the path of a vocabulary file (one token
            a line, as written by :meth:`save`).
        lower_case: case-fold texts before tokenizing.
        pad_token, unknown_token, start_token, end_token: the reserved tokens.

    Attributes:
        pad_id, unknown_id, start_id, end_id: their ids (``pad_id`` is 0 for a
            vocabulary from :func:`train_wordpiece_vocab`).
        vocab_size: number of tokens.
    """

    def __init__(self, vocab, lower_case=True, pad_token="[PAD]", unknown_token="[UNK]",
                 start_token="[START]", end_token="[END]"):
        if isinstance(vocab, (str, Path)):
            vocab = Path(vocab).read_text(encoding="utf-8").splitlines()
        self.vocab = list(vocab)
        self.lower_case = bool(lower_case)
        index = {token: i for i, token in enumerate(self.vocab)}
        ids = {}
        for name, token in (("pad", pad_token), ("unknown", unknown_token),
                            ("start", start_token), ("end", end_token)):
            if token not in index:
                raise ValueError(
                    f"Expected the {name} token {token!r} in the vocabulary. "
                    f"Received: a vocabulary of {len(self.vocab)} tokens without it"
                )
            ids[name] = index[token]
        self.pad_id, self.unknown_id = ids["pad"], ids["unknown"]
        self.start_id, self.end_id = ids["start"], ids["end"]
        self._reserved = {self.pad_id, self.start_id, self.end_id}
        self._wordpiece = tf_text.FastWordpieceTokenizer(
            vocab=self.vocab,
            suffix_indicator="##",
            unknown_token=unknown_token,
            no_pretokenization=True,  # we split words on whitespace ourselves
            support_detokenization=True,
            token_out_type=tf.int32,
        )

    @property
    def vocab_size(self):
        return len(self.vocab)

    def normalize(self, texts):
        """The text that a tokenize/detokenize round trip gives back (list of str)."""
        single = isinstance(texts, str)
        out = [t.decode("utf-8") for t in _normalize([texts] if single else list(texts),
                                                      self.lower_case).numpy()]
        return out[0] if single else out

    def tokenize(self, texts, add_start_end=False):
        """Token ids of each text: an int32 ``tf.RaggedTensor`` ``(N, None)``.

        With ``add_start_end`` each row is ``[START] ... [END]``.
        """
        words = _words(texts, self.lower_case)  # (N, words)
        pieces = self._wordpiece.tokenize(words)  # (N, words, pieces)
        ids = pieces.merge_dims(-2, -1)  # (N, tokens)
        if add_start_end:
            n = ids.nrows()
            start = tf.fill([n, 1], tf.constant(self.start_id, tf.int32))
            end = tf.fill([n, 1], tf.constant(self.end_id, tf.int32))
            ids = tf.concat([start, ids, end], axis=1)
        return ids

    def _rows(self, ids):
        """Ids as lists: drop ``[START]`` and ``[PAD]``, stop at ``[END]``."""
        if isinstance(ids, tf.RaggedTensor):
            rows = ids.to_list()
        elif isinstance(ids, (list, tuple)):  # one row of ids, or rows of any lengths
            if all(np.ndim(r) == 0 for r in ids):
                rows = [list(ids)]
            else:
                rows = [np.asarray(r).reshape(-1).tolist() for r in ids]
        else:
            rows = np.asarray(ids).tolist() if not hasattr(ids, "numpy") else ids.numpy().tolist()
        if rows and not isinstance(rows[0], list):
            rows = [rows]
        clean = []
        for row in rows:
            kept = []
            for token in row:
                token = int(token)
                if token == self.end_id:
                    break
                if token not in self._reserved:
                    kept.append(token)
            clean.append(kept)
        return clean

    def detokenize(self, ids):
        """Clean text for each row of ids (ragged, a list, or a dense array).

        ``[START]`` and ``[PAD]`` are dropped and each row ends at its first
        ``[END]``. Word pieces are joined back into words.
        """
        if not isinstance(ids, (tf.RaggedTensor, tf.Tensor, np.ndarray, list)):
            ids = np.asarray(ids)  # a backend tensor from keras.ops
        rows = self._rows(ids)
        ragged = tf.ragged.constant(rows, dtype=tf.int32, ragged_rank=1) if rows else None
        if ragged is None:
            return []
        if all(len(r) == 0 for r in rows):
            return ["" for _ in rows]
        text = self._wordpiece.detokenize(ragged)
        return [t.decode("utf-8") for t in text.numpy()]

    def id_to_token(self, token_id):
        return self.vocab[int(token_id)]

    def save(self, path):
        """Write the vocabulary, one token a line."""
        Path(path).write_text("\n".join(self.vocab) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path, lower_case=True, **kwargs):
        """A tokenizer from a vocabulary file written by :meth:`save`."""
        return cls(path, lower_case=lower_case, **kwargs)


# ---------------------------------------------------------------------------
# tf.data pipelines.
# ---------------------------------------------------------------------------
def _pad(rows, length, pad_id):
    out = np.full((len(rows), length), pad_id, dtype="int32")
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def seq2seq_dataset(pairs, source_tokenizer, target_tokenizer, batch_size, max_length,
                    shuffle=True, seed=0):
    """A ``tf.data.Dataset`` for teacher-forced sequence-to-sequence training.

    Each element is ``({"encoder_input_ids", "decoder_input_ids"}, labels,
    sample_weight)``, all ``(batch, max_length)``: the target is
    ``[START] y [END]`` split by :func:`keras_decoder.inputs.teacher_forcing`,
    and ``sample_weight`` is 0 on padded labels. Shapes are fixed (padded to
    ``max_length``), so a compiled train step is traced once.

    Pairs whose source has more than ``max_length`` tokens, or whose target
    has more than ``max_length - 1``, are dropped with a warning: truncating a
    target would teach a wrong translation.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("Expected at least one (source, target) pair. Received: 0")
    sources = source_tokenizer.tokenize([s for s, _ in pairs]).to_list()
    targets = target_tokenizer.tokenize([t for _, t in pairs], add_start_end=True).to_list()
    keep = [i for i, (s, t) in enumerate(zip(sources, targets))
            if len(s) <= max_length and len(t) <= max_length + 1]
    if len(keep) < len(pairs):
        warnings.warn(
            f"seq2seq_dataset: dropped {len(pairs) - len(keep)} of {len(pairs)} pairs "
            f"longer than max_length={max_length}.",
            stacklevel=2,
        )
    if not keep:
        raise ValueError(f"Expected some pairs to fit max_length={max_length}. Received: none fits")
    encoder = _pad([sources[i] for i in keep], max_length, source_tokenizer.pad_id)
    target = _pad([targets[i] for i in keep], max_length + 1, target_tokenizer.pad_id)
    forced = {k: np.asarray(v) for k, v in _numpy(teacher_forcing(target, target_tokenizer.pad_id)).items()}
    data = (
        {"encoder_input_ids": encoder, "decoder_input_ids": forced["decoder_input_ids"]},
        forced["labels"],
        forced["sample_weight"],
    )
    dataset = tf.data.Dataset.from_tensor_slices(data)
    if shuffle:
        dataset = dataset.shuffle(len(keep), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _numpy(tree):
    from keras import ops

    return {k: ops.convert_to_numpy(v) for k, v in tree.items()}


def _pack(documents, row_length):
    """Greedy packing of token lists into rows of ``row_length``.

    Returns ``(tokens, segments)``: int32 ``(rows, row_length)``; segment ids
    count documents inside each row from 1, and 0 is padding. A document longer
    than a row is cut.
    """
    rows, segs = [], []
    row, seg, current = [], [], 0
    for doc in documents:
        doc = doc[:row_length]
        if len(row) + len(doc) > row_length:
            rows.append(row)
            segs.append(seg)
            row, seg, current = [], [], 0
        current += 1
        row += doc
        seg += [current] * len(doc)
    if row:
        rows.append(row)
        segs.append(seg)
    return _pad(rows, row_length, 0), _pad(segs, row_length, 0)


def lm_dataset(texts, tokenizer, seq_len, batch_size, pack=True, shuffle=True, seed=0):
    """A ``tf.data.Dataset`` for next-token (decoder-only) training.

    Each document is ``[START] tokens [END]``. With ``pack=True`` several
    documents share a row of ``seq_len + 1`` tokens, and each token carries its
    document's segment id (1, 2, ...; 0 is padding), so that the model can use
    :func:`keras_decoder.masks.segment_mask` to keep documents from attending to
    each other (document masking). With ``pack=False`` each row holds one
    document, padded.

    Each element is ``({"token_ids", "segment_ids"}, labels, sample_weight)``,
    all ``(batch, seq_len)``: ``labels`` are the next tokens, and
    ``sample_weight`` is 0 where the next token is padding or belongs to
    another document (no document is asked to predict the next one's start).
    """
    texts = list(texts)
    if not texts:
        raise ValueError("Expected at least one text. Received: 0")
    docs = tokenizer.tokenize(texts, add_start_end=True).to_list()
    if pack:
        tokens, segments = _pack(docs, seq_len + 1)
    else:
        docs = [d[: seq_len + 1] for d in docs]
        tokens = _pad(docs, seq_len + 1, tokenizer.pad_id)
        segments = (tokens != tokenizer.pad_id).astype("int32")
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    in_seg, out_seg = segments[:, :-1], segments[:, 1:]
    weight = ((out_seg == in_seg) & (out_seg != 0)).astype("float32")
    data = ({"token_ids": inputs, "segment_ids": in_seg}, labels, weight)
    dataset = tf.data.Dataset.from_tensor_slices(data)
    if shuffle:
        dataset = dataset.shuffle(len(inputs), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
