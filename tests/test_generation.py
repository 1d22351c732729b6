"""generate(): the KV-cached decode against full recomputation, samplers, logit processors.

References are independent of ``generate``: uncached greedy runs each row alone,
unpadded, through ``model(ids)`` over the whole prefix at every step; logit
processors have loop-based NumPy versions; beam scores are recomputed from
uncached logits. Small models (dim 32, 2 layers, vocabulary 50) keep XLA
compilation short: one compilation per (configuration, shape).
"""

import gc
import weakref

import keras
import numpy as np
import pytest
from keras import ops

from keras_checks import to_numpy
from keras_decoder import audit_causal_leakage
from keras_decoder import attention as attention_module
from keras_decoder import generation as gen
from keras_decoder.models import DecoderOnlyLM, Seq2SeqTransformer

V, L, C, H, F = 50, 24, 32, 4, 64
N = 6  # new tokens
ARGMAX_TOL = 1e-4  # cached and uncached logits differ by float rounding only
REFERENCE_WIDTH = 12  # longest prompt + N

# Ragged prompts (pad_id = 0): the same rows left- and right-padded.
ROWS = [[7, 3, 9], [5, 2, 8, 4, 6], [11, 12]]


def _padded(rows, side, width=5):
    out = np.zeros((len(rows), width), "int32")
    for i, row in enumerate(rows):
        if side == "left":
            out[i, width - len(row):] = row
        else:
            out[i, :len(row)] = row
    return out


@pytest.fixture(scope="module")
def models():
    """One model per kind for the module (each keeps its compiled decodes); tests
    give them fresh random weights."""
    return {"learned": _lm("learned"), "rotary": _lm("rotary", 2), "seq2seq": _s2s()}


def _lm(position="learned", num_kv_heads=None, seed=0):
    keras.utils.set_random_seed(seed)
    model = DecoderOnlyLM(V, L, C, H, F, num_layers=2, num_kv_heads=num_kv_heads,
                          position=position)
    model(np.ones((1, 1), "int32"))
    return model


def _s2s(seed=0):
    keras.utils.set_random_seed(seed)
    model = Seq2SeqTransformer(V + 5, V, L, C, H, F, num_encoder_layers=1, num_decoder_layers=2)
    model({"encoder_input_ids": np.ones((1, 1), "int32"),
           "decoder_input_ids": np.ones((1, 1), "int32")})
    return model


def _randomise(model, rng, scale=0.3):
    """Fresh random weights: logits far enough apart that argmax is stable."""
    for w in model.weights:
        w.assign((rng.standard_normal(tuple(w.shape)) * scale).astype(w.dtype))


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _uncached_logits(model, ids, source=None):
    """Next-token logits after ``ids`` (one row, no padding): the whole prefix, no cache."""
    # One static shape (eager JAX compiles each op per shape): the prefix, then pads.
    # The logits at the prefix's last position see the prefix only (causal, pads masked).
    buffer = np.zeros((1, REFERENCE_WIDTH), "int32")
    buffer[0, :len(ids)] = ids
    if source is None:
        logits = model(buffer)
    else:
        logits = model({"encoder_input_ids": np.asarray(source, "int32")[None],
                        "decoder_input_ids": buffer})
    out = to_numpy(logits)[0, len(ids) - 1].astype("float64")
    out[0] = -np.inf  # generate never picks pad_id
    return out


def _check_greedy_row(model, prompt, tokens, scores=None, source=None, stop_ids=()):
    """``tokens`` is uncached greedy for ``prompt`` alone: each one the argmax of a
    full recomputation over the prefix (ties within float rounding accepted)."""
    ids = list(prompt)
    for step, token in enumerate(tokens):
        logits = _uncached_logits(model, ids, source)
        assert logits[token] >= logits.max() - ARGMAX_TOL, (
            f"step {step}: generated {token} (logit {logits[token]:.5f}), uncached argmax "
            f"{logits.argmax()} ({logits.max():.5f})")
        if scores is not None:
            np.testing.assert_allclose(scores[step], _log_softmax(logits)[token], atol=1e-4)
        ids.append(int(token))
        if token in stop_ids:
            assert np.all(tokens[step + 1:] == 0), tokens
            break


# ---------------------------------------------------------------------------
# Cached greedy == uncached greedy, each row as if alone.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("position,num_kv_heads", [("learned", None), ("rotary", 2)])
def test_cached_greedy_equals_uncached_per_row(rng, models, position, num_kv_heads):
    model = models[position]
    assert model.num_kv_heads == num_kv_heads
    _randomise(model, rng)
    left = gen.generate(model, _padded(ROWS, "left"), max_new_tokens=N, return_scores=True)
    right = gen.generate(model, _padded(ROWS, "right"), max_new_tokens=N)
    tokens, scores = left
    assert tokens.shape == (3, N) and tokens.dtype == np.int32
    np.testing.assert_array_equal(right, tokens)  # the padding side does not matter
    for i, row in enumerate(ROWS):
        _check_greedy_row(model, row, tokens[i], scores[i])


def test_row_alone_equals_row_in_batch(rng, models):
    model = models["learned"]
    _randomise(model, rng)
    batch = gen.generate(model, _padded(ROWS, "left"), max_new_tokens=N)
    alone = gen.generate(model, np.array([ROWS[0]], "int32"), max_new_tokens=N)
    np.testing.assert_array_equal(alone[0], batch[0])


def test_seq2seq_cached_greedy_equals_uncached(rng, models):
    model = models["seq2seq"]
    _randomise(model, rng)
    sources = [[3, 4, 5], [6, 7, 8, 9, 10], [12, 13]]
    source = _padded(sources, "right")
    start = np.full((3, 1), 1, "int32")  # BOS = 1
    tokens, scores = gen.generate(model, start, max_new_tokens=N, encoder_input_ids=source,
                                  return_scores=True)
    for i, src in enumerate(sources):  # the source alone too: no padding
        _check_greedy_row(model, [1], tokens[i], scores[i], source=src)
    # A ragged decoder prompt, left- and right-padded.
    prompts = [[1, 20], [1, 21, 22, 23], [1]]
    left = gen.generate(model, _padded(prompts, "left", 4), max_new_tokens=N,
                        encoder_input_ids=source)
    right = gen.generate(model, _padded(prompts, "right", 4), max_new_tokens=N,
                         encoder_input_ids=source)
    np.testing.assert_array_equal(left, right)
    for i, (src, prompt) in enumerate(zip(sources, prompts)):
        _check_greedy_row(model, prompt, left[i], source=src)


def test_beam_one_is_greedy_and_beam_scores_match_uncached(rng, models):
    model = models["rotary"]
    _randomise(model, rng)
    prompt = _padded(ROWS, "left")
    greedy = gen.generate(model, prompt, max_new_tokens=N, sampler="greedy")
    np.testing.assert_array_equal(gen.generate(model, prompt, max_new_tokens=N,
                                               sampler=gen.Beam(1)), greedy)
    beams, scores = gen.generate(model, prompt, max_new_tokens=N,
                                 sampler=gen.Beam(3, length_penalty=0.0), return_scores=True)
    assert beams.shape == (3, 3, N) and scores.shape == (3, 3)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    for i, row in enumerate(ROWS):  # each beam's score is its uncached log-probability
        assert len({tuple(b) for b in beams[i]}) == 3  # distinct beams
        for beam, score in zip(beams[i], scores[i]):
            ids, total = list(row), 0.0
            for token in beam:
                total += _log_softmax(_uncached_logits(model, ids))[token]
                ids.append(int(token))
            np.testing.assert_allclose(score, total, atol=1e-3)
        assert scores[i, 0] >= sum(  # at least as good as greedy
            _log_softmax(_uncached_logits(model, list(row) + list(greedy[i, :t])))[greedy[i, t]]
            for t in range(N)) - 1e-3


def test_seq2seq_beam_reorders_the_cache(rng, models):
    model = models["seq2seq"]
    _randomise(model, rng)
    sources = [[3, 4, 5, 6], [7, 8]]
    start = np.full((2, 1), 1, "int32")
    beams, scores = gen.generate(model, start, max_new_tokens=4, sampler=gen.Beam(2, 0.0),
                                 encoder_input_ids=_padded(sources, "right", 4),
                                 return_scores=True)
    for i, src in enumerate(sources):
        for beam, score in zip(beams[i], scores[i]):
            ids, total = [1], 0.0
            for token in beam:
                total += _log_softmax(_uncached_logits(model, ids, src))[token]
                ids.append(int(token))
            np.testing.assert_allclose(score, total, atol=1e-3)


# ---------------------------------------------------------------------------
# Small fake models with hand-set logits (no weights): a transition table.
# ---------------------------------------------------------------------------
class _TableModel:
    """Next-token logits = ``table[previous token]``: a Markov chain as a "model"."""

    trainable_variables = non_trainable_variables = ()
    built = True

    def __init__(self, table, max_length=64):
        self.table = np.asarray(table, "float32")
        self.vocab_size, self.max_length = self.table.shape[0], max_length

    def init_cache(self, batch_size, max_length=None):
        return {"padding": ops.zeros((batch_size, max_length or self.max_length), "bool")}

    def call_with_cache(self, token_ids, cache, cache_index, start_index=None):
        logits = ops.take(ops.convert_to_tensor(self.table), token_ids, axis=0)  # (B, Tq, V)
        return logits, cache


def _chain(transitions, vocab):
    """Log-probability table from ``{token: {next: probability}}`` (the rest: ~0)."""
    table = np.full((vocab, vocab), -30.0)
    for token, nexts in transitions.items():
        for nxt, p in nexts.items():
            table[token, nxt] = np.log(p)
    return table


def test_beam_beats_greedy_on_hand_set_logits():
    # From 1: greedy takes 2 (0.5), then at best 0.34 each; 3 (0.4) leads to 0.9s.
    table = _chain({1: {2: 0.5, 3: 0.4, 4: 0.1}, 2: {1: 0.34, 3: 0.33, 4: 0.33},
                    3: {4: 0.9, 1: 0.1}, 4: {4: 0.9, 1: 0.1}}, 5)
    model = _TableModel(table)
    prompt = np.array([[1]], "int32")

    def total(tokens):
        seq = [1] + list(tokens)
        return sum(_log_softmax(table[a][1:])[b - 1] for a, b in zip(seq, seq[1:]))

    greedy = gen.generate(model, prompt, max_new_tokens=3)
    beams, scores = gen.generate(model, prompt, max_new_tokens=3, sampler=gen.Beam(2, 0.0),
                                 return_scores=True)
    np.testing.assert_array_equal(greedy[0], [2, 1, 2])
    np.testing.assert_array_equal(beams[0, 0], [3, 4, 4])
    assert total(beams[0, 0]) > total(greedy[0]) + 1.0
    np.testing.assert_allclose(scores[0, 0], total(beams[0, 0]), atol=1e-4)
    best = gen.generate(model, prompt, max_new_tokens=3, sampler="beam")
    np.testing.assert_array_equal(best[0], [3, 4, 4])


def test_stop_ids_pad_finished_rows_and_end_the_loop_early():
    # 1 -> 2 -> 3 -> 9 (stop); 5 -> 9; 6 -> 7 -> 6 -> 7 ... never stops.
    model = _TableModel(_chain({1: {2: 1.0}, 2: {3: 1.0}, 3: {9: 1.0}, 5: {9: 1.0},
                                6: {7: 1.0}, 7: {6: 1.0}, 9: {1: 1.0}}, 10))
    prompt = _padded([[1], [4, 5], [1, 2]], "left", 2)
    tokens, steps = gen.generate(model, prompt, max_new_tokens=8, stop_ids=[9],
                                 return_steps=True)
    np.testing.assert_array_equal(tokens, [[2, 3, 9, 0, 0, 0, 0, 0],
                                           [9, 0, 0, 0, 0, 0, 0, 0],
                                           [3, 9, 0, 0, 0, 0, 0, 0]])
    assert steps == 3  # not 8: every row had stopped
    tokens, steps = gen.generate(model, _padded([[1], [6]], "left", 1), max_new_tokens=8,
                                 stop_ids=9, return_steps=True)
    np.testing.assert_array_equal(tokens[1], [7, 6, 7, 6, 7, 6, 7, 6])
    assert steps == 8 and list(tokens[0, 2:]) == [9, 0, 0, 0, 0, 0]


def test_no_repeat_ngram_on_a_looping_model():
    # A model that loops 1 -> 2 -> 3 -> 1 ...; every other token is less likely.
    table = np.random.default_rng(0).uniform(-3.0, -1.0, (V, V))
    for a, b in ((1, 2), (2, 3), (3, 1)):
        table[a, b] = 5.0
    model = _TableModel(table)
    prompt = np.array([[1], [2]], "int32")
    looping = gen.generate(model, prompt, max_new_tokens=30)
    tokens = gen.generate(model, prompt, max_new_tokens=30,
                          logits_processors=[gen.NoRepeatNGram(2)])
    for row, looped, out in zip(prompt, looping, tokens):
        bigrams = list(zip(np.r_[row, looped][:-1], np.r_[row, looped][1:]))
        assert len(set(bigrams)) < len(bigrams)  # without the processor it repeats
        seq = np.r_[row, out]
        bigrams = list(zip(seq[:-1], seq[1:]))
        assert len(set(bigrams)) == len(bigrams), seq


def test_processors_compose_in_order():
    model = _TableModel(np.random.default_rng(1).standard_normal((10, 10)))
    prompt = np.array([[1], [2]], "int32")

    def flip(logits, generated_ids, step):
        return -logits

    ban_then_flip = gen.generate(model, prompt, max_new_tokens=4,
                                 logits_processors=[gen.BanTokens([7]), flip])
    flip_then_ban = gen.generate(model, prompt, max_new_tokens=4,
                                 logits_processors=[flip, gen.BanTokens([7])])
    assert np.all(ban_then_flip == 7)  # -(-inf) = +inf
    assert not np.any(flip_then_ban == 7)


# ---------------------------------------------------------------------------
# Logit processors on constructed logits, against loop-based NumPy.
# ---------------------------------------------------------------------------
def _history(rng, rows=4, length=12, vocab=8):
    """Small vocabulary (many repeats), -1 at the front of some rows."""
    ids = rng.integers(0, vocab, (rows, length)).astype("int32")
    ids[1, :5] = -1
    ids[2, :length - 1] = -1  # one token only
    if rows > 3:
        ids[3] = np.tile([1, 2, 3], length // 3)  # a loop: n-grams repeat
    return ids


def _ref_ngram(logits, ids, n):
    out = logits.copy()
    for r, row in enumerate(ids):
        seq = [int(t) for t in row if t >= 0]
        if len(seq) < n - 1:
            continue
        tail = seq[len(seq) - (n - 1):] if n > 1 else []
        for j in range(len(seq) - n + 1):
            if seq[j:j + n - 1] == tail:
                out[r, seq[j + n - 1]] = -np.inf
    return out


def test_repetition_penalty_matches_ctrl(rng):
    logits = rng.standard_normal((4, 20)).astype("float32") * 3
    ids = _history(rng, vocab=20)
    want = logits.copy()
    for r, row in enumerate(ids):
        for t in set(int(t) for t in row if t >= 0):
            want[r, t] = want[r, t] / 1.5 if want[r, t] > 0 else want[r, t] * 1.5
    got = to_numpy(gen.RepetitionPenalty(1.5)(ops.convert_to_tensor(logits),
                                              ops.convert_to_tensor(ids), 0))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.any(got != logits)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_matches_numpy(rng, n):
    logits = rng.standard_normal((4, 8)).astype("float32")
    ids = _history(rng)
    got = to_numpy(gen.NoRepeatNGram(n)(ops.convert_to_tensor(logits),
                                        ops.convert_to_tensor(ids), 5))
    want = _ref_ngram(logits, ids, n)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_array_equal(got[np.isfinite(want)], want[np.isfinite(want)])
    assert np.isinf(want[3]).sum() >= 1  # the looping row bans its continuation


def test_ban_tokens_and_min_new_tokens(rng):
    logits = rng.standard_normal((3, 10)).astype("float32")
    ids = ops.convert_to_tensor(_history(rng, rows=3, vocab=10))
    x = ops.convert_to_tensor(logits)
    want = logits.copy()
    want[:, [2, 5]] = -np.inf
    np.testing.assert_array_equal(to_numpy(gen.BanTokens([2, 5])(x, ids, 0)), want)
    minimum = gen.MinNewTokens(3, stop_ids=[4, 6])
    early = logits.copy()
    early[:, [4, 6]] = -np.inf
    for step in range(5):
        got = to_numpy(minimum(x, ids, ops.convert_to_tensor(step, "int32")))
        np.testing.assert_array_equal(got, early if step < 3 else logits)


# ---------------------------------------------------------------------------
# Samplers.
# ---------------------------------------------------------------------------
def _draw(sampler, logits, seed):
    """``rows`` independent draws from one row of logits."""
    shape = sampler.noise_shape(logits.shape[0], logits.shape[1])
    noise = None if shape is None else keras.random.uniform(shape, seed=seed)
    return to_numpy(sampler.sample(ops.convert_to_tensor(logits), noise))


def test_top_k_and_top_p_stay_in_their_sets():
    rng = np.random.default_rng(0)
    row = rng.standard_normal(30).astype("float32") * 2
    logits = np.tile(row, (4000, 1))
    probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    order = np.argsort(-row)
    for sampler, allowed in (
            (gen.TopK(4), order[:4]),
            (gen.TopK(3, temperature=0.5), order[:3]),
            (gen.TopP(0.6), order[:np.searchsorted(np.cumsum(probs[order]), 0.6) + 1])):
        draws = _draw(sampler, logits, seed=3)
        assert set(np.unique(draws)) <= set(allowed.tolist()), (sampler, allowed)
        # Frequencies follow the renormalised (tempered) softmax of the allowed set.
        scaled = row[allowed] / sampler.temperature
        want = np.exp(scaled - scaled.max())
        want /= want.sum()
        got = np.array([(draws == t).mean() for t in allowed])
        np.testing.assert_allclose(got, want, atol=4 * np.sqrt(0.25 / len(draws)))


def test_top_p_keeps_the_most_likely_token():
    logits = np.array([[5.0, 0.0, 0.0, 0.0]] * 50, "float32")  # p(0) ~ 0.98 > 0.5
    assert np.all(_draw(gen.TopP(0.5), logits, seed=0) == 0)
    assert np.all(_draw(gen.Greedy(), logits, seed=0) == 0)


def test_sampling_is_reproducible_with_a_seed(rng, models):
    model = models["learned"]
    _randomise(model, rng, scale=0.1)
    prompt = _padded(ROWS, "left")
    kwargs = dict(max_new_tokens=8, sampler=gen.TopK(8))
    a = gen.generate(model, prompt, seed=3, **kwargs)
    np.testing.assert_array_equal(gen.generate(model, prompt, seed=3, **kwargs), a)
    assert not np.array_equal(gen.generate(model, prompt, seed=4, **kwargs), a)


def test_samplers_by_name():
    assert isinstance(gen._get_sampler("greedy"), gen.Greedy)
    assert gen._get_sampler("top_k").k == 10 and gen._get_sampler("top_p").p == 0.9
    assert gen._get_sampler("beam").num_beams == 4
    assert gen.TopK.from_config(gen.TopK(3, 0.7).get_config()).get_config() == {
        "k": 3, "temperature": 0.7}


# ---------------------------------------------------------------------------
# The cached call path passes the causal audit; a planted leak is caught.
# ---------------------------------------------------------------------------
def _cached_path(model, prefill=4):
    """ids ``(B, T)`` → logits through ``call_with_cache``: a prefill, then token by token."""
    def run(ids):
        ids = ops.convert_to_tensor(np.asarray(ids, "int32"))
        batch, length = ids.shape
        cache = model.init_cache(batch, length)
        logits, cache = model.call_with_cache(ids[:, :prefill], cache, 0)
        outputs = [logits]
        for t in range(prefill, length):
            logits, cache = model.call_with_cache(ids[:, t:t + 1], cache, t)
            outputs.append(logits)
        return ops.concatenate(outputs, axis=1)
    return run


def test_causal_audit_on_the_cached_path(rng, models, monkeypatch):
    model = models["rotary"]
    _randomise(model, rng)
    ids = rng.integers(1, V, (2, 8)).astype("int32")
    ids[1, :2] = 0  # left padding
    positions = [1, 3, 5]  # inside the prefill, at its end, and token by token
    report = audit_causal_leakage(_cached_path(model), ids, positions, vocab_size=V)
    assert report.passed, report
    np.testing.assert_allclose(to_numpy(_cached_path(model)(ids))[ids != 0],
                               to_numpy(model(ids))[ids != 0], atol=1e-4)

    def leaky(self, q_pos, k_pos, end, causal):  # planted bug: no causal part in the cache
        k = ops.expand_dims(k_pos, 0)
        return ops.broadcast_to(ops.less(k, end), (q_pos.shape[0], k_pos.shape[0]))[None, None]

    monkeypatch.setattr(attention_module.MultiHeadAttention, "_offset_mask", leaky)
    assert not audit_causal_leakage(_cached_path(model), ids, [1], vocab_size=V).passed


# ---------------------------------------------------------------------------
# Errors, with the numbers.
# ---------------------------------------------------------------------------
def test_errors(models):
    model = models["learned"]
    prompt = _padded(ROWS, "left")
    with pytest.raises(ValueError, match=r"max_new_tokens <= the model's max_length=24\. "
                                         r"Received: max_new_tokens=25"):
        gen.generate(model, prompt, max_new_tokens=25)
    with pytest.raises(ValueError, match=r"no longer than the cache, max_length=24\. "
                                         r"Received: prompt length 30"):
        gen.generate(model, np.ones((1, 30), "int32"), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt length \+ max_new_tokens <= max_length=24\. "
                                         r"Received: 5 \+ 20 = 25"):
        gen.generate(model, prompt, max_new_tokens=20)
    with pytest.raises(ValueError, match=r"stop ids in \[0, vocab_size=50\)\. "
                                         r"Received: stop_ids=\[3, 50\]"):
        gen.generate(model, prompt, max_new_tokens=2, stop_ids=[3, 50])
    with pytest.raises(ValueError, match=r"num_beams >= 1\. Received: num_beams=0"):
        gen.Beam(0)
    with pytest.raises(ValueError, match=r"non-empty prompt batch\. "
                                         r"Received: prompt_ids.shape=\(0, 5\)"):
        gen.generate(model, np.zeros((0, 5), "int32"), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"Received: row 1 = \[4, 0, 5\] has pad_id=0 between"):
        gen.generate(model, np.array([[1, 2, 3], [4, 0, 5]], "int32"), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"row 0 is all pad_id=0"):
        gen.generate(model, np.zeros((1, 3), "int32"), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"Received: sampler='nucleus'"):
        gen.generate(model, prompt, max_new_tokens=2, sampler="nucleus")
    with pytest.raises(ValueError, match=r"Received: k=0"):
        gen.TopK(0)
    with pytest.raises(ValueError, match=r"Received: p=1.5"):
        gen.TopP(1.5)
    with pytest.raises(ValueError, match=r"Received: encoder_input_ids=None"):
        gen.generate(models["seq2seq"], np.ones((1, 1), "int32"), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"Expected no `encoder_input_ids`"):
        gen.generate(model, prompt, max_new_tokens=2, encoder_input_ids=prompt)


def test_a_model_is_freed_with_its_compiled_decodes():
    """The compiled decodes live on the model, so they do not keep it alive."""
    model = _lm(seed=1)
    prompt = np.array([[3, 4], [0, 5]], "int32")
    first = gen.generate(model, prompt, max_new_tokens=2)
    assert len(gen._compiled_decodes(model)) == 1
    np.testing.assert_array_equal(gen.generate(model, prompt, max_new_tokens=2), first)
    assert len(gen._compiled_decodes(model)) == 1  # reused, not compiled again
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None, "a compiled decode kept its model alive"
