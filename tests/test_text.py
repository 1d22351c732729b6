"""keras_decoder.text: WordPiece round trips and tf.data pipelines feeding fit on every backend."""

import keras
import numpy as np
import pytest
from keras import layers, ops

from backend_info import BACKEND, JIT_BACKENDS
from keras_decoder import data, masks
from keras_decoder import text as T


@pytest.fixture(scope="module")
def corpus():
    dates = data.dates(600, seed=11)
    numbers = data.number_words(300, source="en", target="de", seed=11)
    return dates, numbers


@pytest.fixture(scope="module")
def tokenizer(corpus):
    dates, numbers = corpus
    texts = [s for s, _ in dates] + [t for _, t in dates] + [s for p in numbers for s in p]
    return T.Tokenizer(T.train_wordpiece_vocab(texts, vocab_size=400))


def test_vocab_starts_with_reserved_tokens_and_respects_size(tokenizer):
    assert tokenizer.vocab[:4] == list(T.RESERVED_TOKENS)
    assert (tokenizer.pad_id, tokenizer.unknown_id, tokenizer.start_id, tokenizer.end_id) == (0, 1, 2, 3)
    assert 200 <= tokenizer.vocab_size <= 400


def test_round_trip_gives_back_the_normalized_text(corpus, tokenizer):
    dates, numbers = corpus
    texts = [s for p in dates + numbers for s in p]
    ids = tokenizer.tokenize(texts)
    assert tokenizer.unknown_id not in set(ids.flat_values.numpy().tolist())
    assert tokenizer.detokenize(ids) == tokenizer.normalize(texts)
    # Plain Python rows of different lengths (and one row alone) work too.
    assert tokenizer.detokenize(ids.to_list()) == tokenizer.normalize(texts)
    assert tokenizer.detokenize(ids.to_list()[0]) == tokenizer.normalize(texts[:1])
    # Normalization keeps accents and punctuation; it only folds case and spaces.
    assert tokenizer.normalize("  Zwölf  Tausend,\tDREI ") == "zwölf tausend, drei"


def test_start_end_pad_handling(tokenizer):
    ids = tokenizer.tokenize(["3 mars 1998"], add_start_end=True).to_list()[0]
    assert ids[0] == tokenizer.start_id and ids[-1] == tokenizer.end_id
    padded = np.array([ids + [tokenizer.pad_id] * 3 + [tokenizer.end_id]])
    assert tokenizer.detokenize(padded) == ["3 mars 1998"]  # stops at the first [END]
    # A backend tensor is accepted too.
    assert tokenizer.detokenize(ops.convert_to_tensor(padded)) == ["3 mars 1998"]


def test_unknown_characters_become_unk(tokenizer):
    ids = tokenizer.tokenize(["∮"]).to_list()[0]
    assert ids == [tokenizer.unknown_id]


def test_save_and_load(tokenizer, tmp_path):
    path = tmp_path / "vocab.txt"
    tokenizer.save(path)
    again = T.Tokenizer.load(path)
    assert again.vocab == tokenizer.vocab
    text = ["dienstag, 3. märz 1998"]
    assert again.tokenize(text).to_list() == tokenizer.tokenize(text).to_list()


def test_tokenizer_needs_its_reserved_tokens():
    with pytest.raises(ValueError, match=r"\[END\]"):
        T.Tokenizer(["[PAD]", "[UNK]", "[START]", "a"])


def test_seq2seq_dataset_is_teacher_forced(corpus, tokenizer):
    dates, _ = corpus
    ds = T.seq2seq_dataset(dates[:64], tokenizer, tokenizer, batch_size=16, max_length=20, shuffle=False)
    x, labels, weight = next(iter(ds))
    enc, dec = x["encoder_input_ids"].numpy(), x["decoder_input_ids"].numpy()
    labels, weight = labels.numpy(), weight.numpy()
    assert enc.shape == dec.shape == labels.shape == weight.shape == (16, 20)
    assert (dec[:, 0] == tokenizer.start_id).all()
    np.testing.assert_array_equal(dec[:, 1:], np.where(labels[:, :-1] == tokenizer.end_id, tokenizer.end_id, labels[:, :-1]))
    np.testing.assert_array_equal(weight, (labels != tokenizer.pad_id).astype("float32"))
    assert tokenizer.detokenize(labels[:1]) == tokenizer.normalize([dates[0][1]])
    assert tokenizer.detokenize(enc[:1]) == tokenizer.normalize([dates[0][0]])


def test_seq2seq_dataset_drops_pairs_that_do_not_fit(corpus, tokenizer):
    dates, _ = corpus
    with pytest.warns(UserWarning, match=r"dropped \d+ of 50"):
        T.seq2seq_dataset(dates[:50], tokenizer, tokenizer, batch_size=8, max_length=5)


def test_lm_dataset_packs_documents_with_segments(corpus, tokenizer):
    texts = [s for s, _ in corpus[0][:40]]
    packed = T.lm_dataset(texts, tokenizer, seq_len=32, batch_size=64, shuffle=False)
    x, labels, weight = next(iter(packed))
    tokens, segments = x["token_ids"].numpy(), x["segment_ids"].numpy()
    assert segments.max() > 1  # several documents share a row
    # Every document in a row is [START] ... [END].
    for row, seg in zip(tokens, segments):
        for s in set(seg.tolist()) - {0}:
            doc = row[seg == s]
            assert doc[0] == tokenizer.start_id
    # No label crosses a document boundary or points at padding.
    crossing = segments[:, 1:] != segments[:, :-1]  # token i+1 starts another document
    assert crossing.any()
    assert not weight.numpy()[:, :-1][crossing].any()
    assert weight.numpy()[:, :-1][~crossing & (segments[:, 1:] != 0)].all()
    unpacked = T.lm_dataset(texts, tokenizer, seq_len=32, batch_size=64, pack=False, shuffle=False)
    x2, _, _ = next(iter(unpacked))
    assert x2["segment_ids"].numpy().max() == 1
    assert x2["token_ids"].shape[0] == len(texts) and x["token_ids"].shape[0] < len(texts)


# ---------------------------------------------------------------- fit on every backend
def _tiny_seq2seq(vocab, length, dim=16):
    enc_ids = keras.Input((length,), dtype="int32", name="encoder_input_ids")
    dec_ids = keras.Input((length,), dtype="int32", name="decoder_input_ids")
    embed = layers.Embedding(vocab, dim)
    memory = embed(enc_ids)
    x = embed(dec_ids)
    cross = masks.cross_attention_mask(None, masks.padding_mask(enc_ids))
    causal = masks.self_attention_mask(masks.padding_mask(dec_ids))
    x = x + layers.MultiHeadAttention(2, 8)(x, x, attention_mask=causal)
    x = x + layers.MultiHeadAttention(2, 8)(x, memory, attention_mask=cross)
    return keras.Model({"encoder_input_ids": enc_ids, "decoder_input_ids": dec_ids}, layers.Dense(vocab)(x))


def _tiny_packed_lm(vocab, length, dim=16):
    ids = keras.Input((length,), dtype="int32", name="token_ids")
    seg = keras.Input((length,), dtype="int32", name="segment_ids")
    x = layers.Embedding(vocab, dim)(ids)
    mask = masks.combine_masks(masks.segment_mask(seg), masks.causal_mask(length))
    x = x + layers.MultiHeadAttention(2, 8)(x, x, attention_mask=mask)
    return keras.Model({"token_ids": ids, "segment_ids": seg}, layers.Dense(vocab)(x))


def _fit_one_step(model, dataset):
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=BACKEND in JIT_BACKENDS)
    history = model.fit(dataset.take(1), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_seq2seq_dataset_feeds_fit(corpus, tokenizer):
    ds = T.seq2seq_dataset(corpus[0][:32], tokenizer, tokenizer, batch_size=16, max_length=20)
    _fit_one_step(_tiny_seq2seq(tokenizer.vocab_size, 20), ds)


def test_lm_dataset_feeds_fit(corpus, tokenizer):
    ds = T.lm_dataset([s for s, _ in corpus[0][:60]], tokenizer, seq_len=24, batch_size=8)
    _fit_one_step(_tiny_packed_lm(tokenizer.vocab_size, 24), ds)
