"""Generation: a KV cache, samplers, logit processors, compiled decoding.

:func:`generate` turns a prompt into new tokens, one compiled loop for the
whole decode::

    prompt = [[0, 0, 5, 9, 2],        # left-padded (pad_id = 0) ...
              [7, 3, 8, 4, 1]]
    tokens = generate(model, prompt, max_new_tokens=20)               # (2, 20) int32
    tokens = generate(model, prompt, max_new_tokens=20, sampler=TopP(0.9), seed=1)
    tokens = generate(model, prompt, max_new_tokens=20,
                      logits_processors=[NoRepeatNGram(3), RepetitionPenalty(1.2)])
    beams, scores = generate(model, prompt, max_new_tokens=20, sampler=Beam(4),
                             return_scores=True)                      # (2, 4, 20), (2, 4)

What the masks do here, and what they do not:

* **Attention masks** (causal, padding) decide *what a position may look at*.
  In a cached decode the causal mask is offset by ``cache_index``, and the
  padding of each row is written into the cache with its keys.
* **Logit masks** decide *what may come next*. The seed article credits the
  attention mask with preventing repetitive output; it does not: a causal
  model may repeat itself forever. Repetition is stopped by masking *logits*:
  :class:`NoRepeatNGram`, :class:`RepetitionPenalty`, :class:`BanTokens`,
  :class:`MinNewTokens`. Each is a small callable
  ``(logits (R, V), generated_ids (R, T), step) -> logits (R, V)``, and they
  compose in order.

How a batch of prompts of different lengths is decoded:

1. The padding side of each row is read from where ``pad_id`` sits (a row with
   a pad *between* real tokens is an error). Every row is then left-aligned
   to the right: ``[pad, pad, a, b, c]``. Right-padded prompts are moved, so
   both sides give the same result.
2. A row's positions start at its first real token (``start_index = cache_index
   - number_of_pads``), and its pads are masked as keys: each row gives what it
   would give alone, unpadded. (KerasHub's ``generate`` cannot do this:
   its positions count the left pads, keras-team/keras-hub#2237.)
3. The prompt, except its last token, fills the cache in one call (prefill).
   Then each step feeds one token at ``cache_index = P - 1 + step`` and picks
   the next one. ``pad_id`` itself is never picked (its logit is masked), so a
   pad in the output always means "finished".
4. A row that emits a stop id is finished: it gets ``pad_id`` from then on.
   The loop stops as soon as every row has finished.

The whole decode (prefill and loop, a ``keras.ops.while_loop``) is compiled
once per (batch, prompt length, ``max_new_tokens``) and configuration:
``tf.function(jit_compile=True)`` (XLA) on TensorFlow, ``jax.jit`` with the
model's variables passed as state (``keras.StatelessScope``) on JAX. On torch
it runs eagerly under ``torch.inference_mode()``; there, per-call Python work
dominates a step, so a float32 model's sublayers are called directly
(``layer.call``) and the private KV cache is written in place
(:mod:`keras_decoder._calls`), with the same tokens.

Shapes: ``B`` batch, ``K`` beams, ``R = B * K`` decoded rows, ``P`` prompt
length (after alignment), ``N`` ``max_new_tokens``, ``T = P + N``, ``V``
vocabulary.
"""

import contextlib

import keras
import numpy as np
from keras import ops

from keras_decoder._calls import direct_calls, direct_calls_allowed

__all__ = [
    "generate", "Sampler", "Greedy", "TopK", "TopP", "Beam",
    "LogitsProcessor", "RepetitionPenalty", "NoRepeatNGram", "BanTokens", "MinNewTokens",
]

_PACKAGE = "keras_decoder"
_NO_TOKEN = -1  # in ``generated_ids``: padding, or not generated yet
_NEG_INF = float("-inf")


def _int_list(ids, name):
    """A tuple of Python ints from an int, a list, an array or a tensor."""
    if ids is None:
        return ()
    values = np.asarray(ops.convert_to_numpy(ids) if not isinstance(ids, (int, list, tuple))
                        else ids)
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"Expected integer token ids for `{name}`. Received: {name}={ids!r}")
    return tuple(int(v) for v in values.reshape(-1))


def _mask_tokens(logits, ids):
    """``logits`` ``(R, V)`` with the columns ``ids`` set to -inf."""
    if not ids:
        return logits
    vocab = logits.shape[-1]
    banned = np.zeros((vocab,), bool)
    banned[[i for i in ids if 0 <= i < vocab]] = True
    return ops.where(ops.convert_to_tensor(banned)[None], _NEG_INF, logits)


def _gumbel(noise):
    """Gumbel(0, 1) noise from uniform ``noise`` in [0, 1)."""
    tiny = 1e-20
    return -ops.log(-ops.log(ops.clip(noise, tiny, 1.0 - 1e-7)))


# ---------------------------------------------------------------------------
# Samplers: logits (R, V) -> next token (R,).
# ---------------------------------------------------------------------------
class _Configurable:
    """``get_config`` / ``from_config`` / ``repr`` shared by samplers and processors."""

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Sampler(_Configurable):
    """Base class: picks the next token from processed logits.

    Subclasses implement :meth:`sample` and, when they are random,
    :meth:`noise_shape` (how much uniform noise one step needs).
    """

    num_beams = 1

    def noise_shape(self, rows, vocab_size):
        """Shape of the uniform ``[0, 1)`` noise one step needs, or ``None``."""
        return None

    def sample(self, logits, noise=None):
        """Logits ``(R, V)`` float32 (-inf = forbidden) → int32 tokens ``(R,)``."""
        raise NotImplementedError



@keras.saving.register_keras_serializable(package=_PACKAGE)
class Greedy(Sampler):
    """Always the most likely token (``argmax``); deterministic."""

    def sample(self, logits, noise=None):
        return ops.cast(ops.argmax(logits, axis=-1), "int32")


def _check_temperature(temperature):
    if not temperature > 0:
        raise ValueError(f"Expected temperature > 0. Received: temperature={temperature}")
    return float(temperature)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TopK(Sampler):
    """Sample among the ``k`` most likely tokens, after dividing by ``temperature``.

    Args:
        k: how many candidates (``1 <= k``; capped at the vocabulary size).
        temperature: ``> 0``; below 1 sharpens, above 1 flattens.

    Example: ``generate(model, prompt, max_new_tokens=8, sampler=TopK(5), seed=0)``.
    """

    def __init__(self, k=10, temperature=1.0):
        if int(k) < 1:
            raise ValueError(f"Expected k >= 1. Received: k={k}")
        self.k, self.temperature = int(k), _check_temperature(temperature)

    def noise_shape(self, rows, vocab_size):
        return (rows, min(self.k, vocab_size))

    def sample(self, logits, noise=None):
        k = min(self.k, logits.shape[-1])
        values, indices = ops.top_k(logits / self.temperature, k)  # (R, k), sorted
        choice = ops.argmax(values + _gumbel(noise), axis=-1)  # Gumbel-max: a softmax draw
        token = ops.take_along_axis(indices, ops.expand_dims(choice, -1), axis=-1)
        return ops.cast(token[:, 0], "int32")

    def get_config(self):
        return {"k": self.k, "temperature": self.temperature}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TopP(Sampler):
    """Nucleus sampling: the smallest set of tokens whose probability reaches ``p``.

    Tokens are sorted by probability (after ``temperature``); a token is kept
    when the probability of the tokens before it is still below ``p``, so the
    most likely token is always kept.

    Args:
        p: in ``(0, 1]``.
        temperature: ``> 0``.
    """

    def __init__(self, p=0.9, temperature=1.0):
        if not 0.0 < p <= 1.0:
            raise ValueError(f"Expected 0 < p <= 1. Received: p={p}")
        self.p, self.temperature = float(p), _check_temperature(temperature)

    def noise_shape(self, rows, vocab_size):
        return (rows, vocab_size)

    def sample(self, logits, noise=None):
        vocab = logits.shape[-1]
        values, indices = ops.top_k(logits / self.temperature, vocab)  # (R, V), descending
        probs = ops.softmax(values, axis=-1)
        before = ops.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        values = ops.where(before < self.p, values, _NEG_INF)
        choice = ops.argmax(values + _gumbel(noise), axis=-1)
        token = ops.take_along_axis(indices, ops.expand_dims(choice, -1), axis=-1)
        return ops.cast(token[:, 0], "int32")

    def get_config(self):
        return {"p": self.p, "temperature": self.temperature}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Beam(Sampler):
    """Beam search: keep the ``num_beams`` sequences of highest total log-probability.

    At each step every beam is extended by every token, and the best
    ``num_beams`` of the ``num_beams × V`` candidates survive (the first step
    starts from one beam, so no two beams are the same). A beam that emitted
    a stop id stays in the set, extended by ``pad_id`` at no cost. At the end
    the beams are ranked by ``sum(log p) / length ** length_penalty``, with
    ``length`` the number of tokens the beam generated (its stop id included).

    With ``return_scores=True``, :func:`generate` returns every beam, best
    first: ``(tokens (B, K, N), scores (B, K))``; otherwise the best beam
    ``(B, N)``. ``Beam(1)`` is :class:`Greedy`.

    Args:
        num_beams: ``K >= 1``.
        length_penalty: ``> 0`` favours longer beams, ``< 0`` shorter ones.
    """

    def __init__(self, num_beams=4, length_penalty=1.0):
        if int(num_beams) < 1:
            raise ValueError(f"Expected num_beams >= 1. Received: num_beams={num_beams}")
        self.num_beams, self.length_penalty = int(num_beams), float(length_penalty)

    def get_config(self):
        return {"num_beams": self.num_beams, "length_penalty": self.length_penalty}


_SAMPLERS = {"greedy": Greedy, "top_k": TopK, "topk": TopK, "top_p": TopP, "topp": TopP,
             "beam": Beam}


def _get_sampler(sampler):
    if isinstance(sampler, Sampler):
        return sampler
    if isinstance(sampler, str) and sampler.lower() in _SAMPLERS:
        return _SAMPLERS[sampler.lower()]()
    raise ValueError(
        f"Expected a Sampler or one of {sorted(set(_SAMPLERS))}. Received: sampler={sampler!r}")


# ---------------------------------------------------------------------------
# Logit processors: (logits (R, V), generated_ids (R, T), step) -> logits.
# ---------------------------------------------------------------------------
class LogitsProcessor(_Configurable):
    """Base class: a mask or a rescaling applied to the next-token logits.

    Call arguments:
        logits: float32 ``(R, V)``; ``-inf`` marks a forbidden token.
        generated_ids: int32 ``(R, T)``: every token so far, prompt included,
            **newest last**; ``-1`` where there is no token (padding, or room
            for tokens not generated yet, at the front).
        step: int scalar (a tensor inside the compiled loop): how many new
            tokens were generated before this one.

    Returns:
        float32 ``(R, V)``.
    """

    def __call__(self, logits, generated_ids, step):
        raise NotImplementedError


def _presence(generated_ids, vocab_size):
    """bool ``(R, V)``: which tokens occur in ``generated_ids`` (``-1`` never does)."""
    vocab = ops.arange(vocab_size, dtype="int32")
    return ops.any(ops.equal(ops.expand_dims(generated_ids, -1), vocab), axis=1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RepetitionPenalty(LogitsProcessor):
    """CTRL's repetition penalty (Keskar et al., 2019).

    Every token that already occurs (prompt included) gets its logit divided
    by ``penalty`` when positive and multiplied by it when negative: less
    likely either way for ``penalty > 1``.

    Args:
        penalty: ``> 0``; ``1.0`` changes nothing, CTRL used ``1.2``.
    """

    def __init__(self, penalty):
        if not penalty > 0:
            raise ValueError(f"Expected penalty > 0. Received: penalty={penalty}")
        self.penalty = float(penalty)

    def __call__(self, logits, generated_ids, step):
        seen = _presence(generated_ids, logits.shape[-1])  # (R, V)
        penalised = ops.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return ops.where(seen, penalised, logits)

    def get_config(self):
        return {"penalty": self.penalty}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class NoRepeatNGram(LogitsProcessor):
    """Forbid any token that would complete an n-gram that already occurred.

    If the last ``n - 1`` tokens are ``a b`` (``n = 3``) and ``a b c`` occurs
    earlier in the sequence (prompt included), ``c`` is forbidden. ``n = 1``
    forbids every token seen so far.

    Args:
        n: n-gram length, ``>= 1``.
    """

    def __init__(self, n):
        if int(n) < 1:
            raise ValueError(f"Expected n >= 1. Received: n={n}")
        self.n = int(n)

    def __call__(self, logits, generated_ids, step):
        n, vocab = self.n, logits.shape[-1]
        if n == 1:
            return ops.where(_presence(generated_ids, vocab), _NEG_INF, logits)
        length = generated_ids.shape[1]
        if length < n:
            return logits
        windows = length - n + 1  # n-grams so far: start j, prefix j..j+n-2, next j+n-1
        tail = generated_ids[:, length - (n - 1):]  # (R, n-1): the newest tokens
        match = ops.all(tail >= 0, axis=-1, keepdims=True)  # (R, 1): enough tokens yet
        for i in range(n - 1):
            prefix = generated_ids[:, i:i + windows]  # (R, W): token i of each n-gram
            match = ops.logical_and(match, ops.equal(prefix, tail[:, i:i + 1]))
        following = generated_ids[:, n - 1:]  # (R, W): the token that completed it
        following = ops.where(match, following, _NO_TOKEN)
        banned = _presence(following, vocab)  # (R, V)
        return ops.where(banned, _NEG_INF, logits)

    def get_config(self):
        return {"n": self.n}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BanTokens(LogitsProcessor):
    """Never generate ``ids`` (their logits become ``-inf``).

    Args:
        ids: an int or a list of token ids.
    """

    def __init__(self, ids):
        self.ids = _int_list(ids, "ids")

    def __call__(self, logits, generated_ids, step):
        return _mask_tokens(logits, self.ids)

    def get_config(self):
        return {"ids": list(self.ids)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MinNewTokens(LogitsProcessor):
    """Forbid the stop ids until ``n`` new tokens have been generated.

    Args:
        n: the minimum number of new tokens before a stop id may come.
        stop_ids: an int or a list of ids (usually ``generate``'s ``stop_ids``).
    """

    def __init__(self, n, stop_ids):
        if int(n) < 0:
            raise ValueError(f"Expected n >= 0. Received: n={n}")
        self.n, self.stop_ids = int(n), _int_list(stop_ids, "stop_ids")

    def __call__(self, logits, generated_ids, step):
        return ops.where(ops.less(step, self.n), _mask_tokens(logits, self.stop_ids), logits)

    def get_config(self):
        return {"n": self.n, "stop_ids": list(self.stop_ids)}


# ---------------------------------------------------------------------------
# Inputs: checks and left alignment (NumPy, outside the compiled loop).
# ---------------------------------------------------------------------------
def _vocab_size(model):
    for name in ("vocab_size", "target_vocab_size"):
        if getattr(model, name, None) is not None:
            return int(getattr(model, name))
    raise ValueError(f"Expected a model with `vocab_size` or `target_vocab_size`. "
                     f"Received: {type(model).__name__}")


def _align_left(prompt, pad_id):
    """Left-pad every row: ``(B, Tp)`` → ``(aligned (B, P), pads (B,))``.

    ``P`` is the longest row. Raises ``ValueError`` for a row with a pad
    between real tokens, or with no real token.
    """
    real = prompt != pad_id
    lengths = real.sum(axis=1)
    for row in range(prompt.shape[0]):
        where = np.flatnonzero(real[row])
        if where.size == 0:
            raise ValueError(f"Expected at least one real (non-pad) token per prompt row. "
                             f"Received: row {row} is all pad_id={pad_id}")
        if where[-1] - where[0] + 1 != where.size:
            raise ValueError(
                f"Expected padding only before or after the real tokens of a prompt row. "
                f"Received: row {row} = {prompt[row].tolist()} has pad_id={pad_id} between "
                f"real tokens")
    width = int(lengths.max())
    aligned = np.full((prompt.shape[0], width), pad_id, "int32")
    for row in range(prompt.shape[0]):
        aligned[row, width - lengths[row]:] = prompt[row][real[row]]
    return aligned, (width - lengths).astype("int32")


def _check(model, prompt, max_new_tokens, stop_ids, vocab_size):
    if prompt.ndim != 2:
        raise ValueError(f"Expected prompt_ids of shape (batch, prompt_len). "
                         f"Received: prompt_ids.shape={prompt.shape}")
    if prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"Expected a non-empty prompt batch. "
                         f"Received: prompt_ids.shape={prompt.shape}")
    max_length = int(model.max_length)
    if not 1 <= max_new_tokens <= max_length:
        raise ValueError(f"Expected 1 <= max_new_tokens <= the model's max_length={max_length}. "
                         f"Received: max_new_tokens={max_new_tokens}")
    if prompt.shape[1] > max_length:
        raise ValueError(f"Expected a prompt no longer than the cache, max_length={max_length}. "
                         f"Received: prompt length {prompt.shape[1]}")
    bad = [i for i in stop_ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"Expected stop ids in [0, vocab_size={vocab_size}). "
                         f"Received: stop_ids={list(stop_ids)}")


# ---------------------------------------------------------------------------
# The decode loop (backend-neutral keras.ops; compiled by _compile).
# ---------------------------------------------------------------------------
def _uniform(shape, seed, step):
    """Uniform ``[0, 1)`` noise for one step, a pure function of ``(seed, step)``."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        return jax.random.uniform(key, shape)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.random.stateless_uniform(shape, seed=tf.stack([seed, step]))
    # Eager backends: a per-step integer seed.
    step_seed = (int(seed) * 1_000_003 + int(step)) % (2**31 - 1)
    return keras.random.uniform(shape, seed=step_seed)


def _reorder_cache(cache, rows):
    """Gather the decoded rows ``rows`` ``(R,)`` of every per-row cache tensor."""
    shared = ("cross_attention", "memory_mask")  # the same within a beam group: kept
    return {key: value if key in shared else keras.tree.map_structure(
        lambda x: ops.take(x, rows, axis=0), value) for key, value in cache.items()}


class _Decoder:
    """Prefill plus a ``while_loop`` over the steps; everything static is fixed here."""

    def __init__(self, model, sampler, processors, stop_ids, pad_id, batch, prompt_len,
                 max_new_tokens, seq2seq, return_scores):
        self.model, self.sampler, self.processors = model, sampler, tuple(processors)
        self.stop_ids, self.pad_id = tuple(stop_ids), int(pad_id)
        self.beam = isinstance(sampler, Beam)
        self.num_beams = sampler.num_beams if self.beam else 1
        self.batch, self.prompt_len, self.max_new_tokens = batch, prompt_len, max_new_tokens
        self.rows = batch * self.num_beams
        self.cache_len = prompt_len + max_new_tokens
        self.vocab_size, self.seq2seq = _vocab_size(model), seq2seq
        self.return_scores = bool(return_scores)
        pad_column = np.zeros((1, self.vocab_size), bool)
        pad_column[0, self.pad_id] = 0 <= self.pad_id < self.vocab_size
        self.pad_column = ops.convert_to_tensor(pad_column)

    # -- one step's pieces ------------------------------------------------
    def _logits(self, token, cache, index, pads):
        """Feed ``token`` ``(R,)`` at ``index``; → ``(logits (R, V), cache)``."""
        logits, cache = self.model.call_with_cache(
            ops.expand_dims(token, 1), cache, index, start_index=index - pads)
        return ops.cast(logits[:, 0], "float32"), cache

    def _process(self, logits, history, step):
        for processor in self.processors:
            logits = processor(logits, history, step)
        # pad_id is never generated: a pad in the output means "finished".
        return ops.where(self.pad_column, _NEG_INF, logits)

    def _is_stop(self, token):
        stop = ops.zeros_like(token, dtype="bool")
        for i in self.stop_ids:
            stop = ops.logical_or(stop, ops.equal(token, i))
        return stop

    @staticmethod
    def _push(history, token):
        """Append ``token`` ``(R,)`` as the newest column (``-1`` for a pad)."""
        return ops.concatenate([history[:, 1:], ops.expand_dims(token, 1)], axis=1)

    # -- the whole decode -------------------------------------------------
    def __call__(self, prompt, pads, seed, encoder_input_ids=None):
        """``prompt`` ``(R, P)`` left-aligned, ``pads`` ``(R,)``, ``seed`` scalar int32."""
        model, R, P, N = self.model, self.rows, self.prompt_len, self.max_new_tokens
        if self.seq2seq:
            cache = model.init_cache(R, self.cache_len, encoder_input_ids=encoder_input_ids)
        else:
            cache = model.init_cache(R, self.cache_len)
        if P > 1:  # prefill: every prompt token but the last
            _, cache = model.call_with_cache(prompt[:, :P - 1], cache, 0, start_index=-pads)
        history = ops.where(ops.equal(prompt, self.pad_id), _NO_TOKEN, prompt)
        history = ops.concatenate(
            [ops.full((R, N), _NO_TOKEN, dtype="int32"), history], axis=1)  # (R, T)
        state = dict(
            step=ops.convert_to_tensor(0, dtype="int32"),
            token=prompt[:, P - 1], cache=cache, history=history,
            out=ops.full((R, N), self.pad_id, dtype="int32"),
            done=ops.zeros((R,), dtype="bool"),
        )
        if self.beam:
            state.update(beam_score=ops.convert_to_tensor(np.tile(
                np.array([0.0] + [_NEG_INF] * (self.num_beams - 1), "float32"), self.batch)),
                length=ops.zeros((R,), dtype="int32"))
            body = self._beam_step
        else:
            if self.return_scores:
                state.update(scores=ops.zeros((R, N), dtype="float32"))
            body = self._sample_step
        keys = sorted(state)

        def cond(*values):
            s = dict(zip(keys, values))
            return ops.logical_and(ops.less(s["step"], N), ops.logical_not(ops.all(s["done"])))

        def loop_body(*values):
            s = body(dict(zip(keys, values)), pads, seed)
            return tuple(s[k] for k in keys)

        final = dict(zip(keys, ops.while_loop(cond, loop_body, tuple(state[k] for k in keys))))
        if self.beam:
            return final["out"], final["beam_score"], final["length"], final["step"]
        scores = final["scores"] if self.return_scores else final["out"][:, :0]
        return final["out"], scores, final["step"]

    def _write(self, out, step, token):
        return ops.slice_update(out, (0, step), ops.expand_dims(token, 1))

    def _sample_step(self, s, pads, seed):
        step = s["step"]
        index = self.prompt_len - 1 + step
        logits, cache = self._logits(s["token"], s["cache"], index, pads)
        logits = self._process(logits, s["history"], step)  # (R, V)
        shape = self.sampler.noise_shape(self.rows, self.vocab_size)
        noise = None if shape is None else _uniform(shape, seed, step)
        token = self.sampler.sample(logits, noise)  # (R,)
        token = ops.where(s["done"], self.pad_id, token)
        new = dict(step=step + 1, token=token, cache=cache, history=s["history"],
                   out=self._write(s["out"], step, token), done=s["done"])
        if self.processors:  # only they read the history
            new["history"] = self._push(s["history"], ops.where(s["done"], _NO_TOKEN, token))
        if self.stop_ids:
            new["done"] = ops.logical_or(s["done"], self._is_stop(token))
        if self.return_scores:
            logp = ops.take_along_axis(ops.log_softmax(logits, axis=-1),
                                       ops.expand_dims(token, 1), axis=1)[:, 0]
            new["scores"] = self._write(s["scores"], step, ops.where(s["done"], 0.0, logp))
        return new

    def _beam_step(self, s, pads, seed):
        B, K, V = self.batch, self.num_beams, self.vocab_size
        step = s["step"]
        index = self.prompt_len - 1 + step
        logits, cache = self._logits(s["token"], s["cache"], index, pads)
        logp = ops.log_softmax(self._process(logits, s["history"], step), axis=-1)  # (R, V)
        # A finished beam goes on with pad_id at no cost (and nothing else).
        only_pad = np.full((1, V), _NEG_INF, "float32")
        only_pad[0, self.pad_id] = 0.0
        logp = ops.where(ops.expand_dims(s["done"], 1), ops.convert_to_tensor(only_pad), logp)
        total = ops.expand_dims(s["beam_score"], 1) + logp  # (R, V)
        best, flat = ops.top_k(ops.reshape(total, (B, K * V)), K)  # (B, K)
        flat = ops.cast(flat, "int32")
        source = ops.reshape(flat // V + ops.arange(B, dtype="int32")[:, None] * K, (-1,))  # (R,)
        token = ops.reshape(flat % V, (-1,))  # (R,)
        was_done = ops.take(s["done"], source, axis=0)
        done = ops.logical_or(was_done, self._is_stop(token))
        history = ops.take(s["history"], source, axis=0)
        length = ops.take(s["length"], source, axis=0) + ops.cast(
            ops.logical_not(was_done), "int32")
        return dict(step=step + 1, token=token, cache=_reorder_cache(cache, source),
                    history=self._push(history, ops.where(was_done, _NO_TOKEN, token)),
                    out=self._write(ops.take(s["out"], source, axis=0), step, token),
                    beam_score=ops.reshape(best, (-1,)), length=length, done=done)


# ---------------------------------------------------------------------------
# Compilation, one function per (model, configuration, shapes).
# ---------------------------------------------------------------------------
# Each model keeps its compiled decodes in an attribute of its own (not a
# global table): a compiled decode refers to its model, so a global table would
# keep every model alive; this way they are freed together.
_COMPILED_ATTR = "_keras_decoder_compiled_decodes"


def _compiled_decodes(model):
    """``{key: compiled decode}`` of ``model`` (created empty on first use)."""
    table = getattr(model, _COMPILED_ATTR, None)
    if table is None:
        table = {}
        object.__setattr__(model, _COMPILED_ATTR, table)  # untracked by Keras and torch
    return table


def _compile_jax(model, fn):
    import jax

    def stateless(trainable, non_trainable, *args):
        mapping = list(zip(model.trainable_variables, trainable))
        mapping += list(zip(model.non_trainable_variables, non_trainable))
        with keras.StatelessScope(state_mapping=mapping):
            return fn(*args)

    jitted = jax.jit(stateless)

    def run(*args):
        return jitted([v.value for v in model.trainable_variables],
                      [v.value for v in model.non_trainable_variables], *args)

    return run


def _compile_tensorflow(fn):
    import tensorflow as tf

    return tf.function(fn, jit_compile=True, reduce_retracing=False)


@contextlib.contextmanager
def _eager_decoding(model):
    """Torch decodes eagerly: no autograd bookkeeping, and, where the model
    allows it, sublayers called without ``Layer.__call__``'s per-call work and
    the private cache written in place (:mod:`keras_decoder._calls`). Under
    TensorFlow and JAX the decode is traced once, so nothing changes there."""
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    fast = direct_calls(in_place=True) if direct_calls_allowed(model) else contextlib.nullcontext()
    with torch.inference_mode(), fast:
        yield


def _compiled(model, decoder, key):
    table = _compiled_decodes(model)
    if key not in table:
        backend = keras.backend.backend()
        if backend == "jax":
            table[key] = _compile_jax(model, decoder)
        elif backend == "tensorflow":
            table[key] = _compile_tensorflow(decoder)
        else:
            table[key] = decoder
    return table[key]


# ---------------------------------------------------------------------------
# The public function.
# ---------------------------------------------------------------------------
def generate(model, prompt_ids, *, max_new_tokens, sampler="greedy", logits_processors=(),
             stop_ids=None, pad_id=0, seed=None, encoder_input_ids=None, return_scores=False,
             return_steps=False):
    """Generate ``max_new_tokens`` tokens after each prompt, with a KV cache.

    Args:
        model: a :class:`~keras_decoder.models.DecoderOnlyLM` or
            :class:`~keras_decoder.models.Seq2SeqTransformer` (anything with
            ``max_length``, ``vocab_size``/``target_vocab_size``,
            ``init_cache`` and ``call_with_cache``).
        prompt_ids: int ``(B, Tp)``: left- or right-padded with ``pad_id``
            (each row may differ), with no pad between real tokens. For a
            ``Seq2SeqTransformer``, the decoder's start: usually ``[[bos]] * B``.
        max_new_tokens: ``N``, how many tokens to generate.
        sampler: :class:`Greedy`, :class:`TopK`, :class:`TopP`, :class:`Beam`,
            or a name: ``"greedy"``, ``"top_k"`` (``k=10``), ``"top_p"``
            (``p=0.9``), ``"beam"`` (4 beams).
        logits_processors: :class:`LogitsProcessor` s (or any callable
            ``(logits, generated_ids, step) -> logits``), applied in order.
        stop_ids: an id or a list of ids; a row that emits one is finished.
        pad_id: the prompt padding, and what finished rows get (default 0).
            It is never generated.
        seed: int; the same seed gives the same samples on a given backend.
            ``None`` draws one. Greedy and beam search ignore it.
        encoder_input_ids: int ``(B, S)``, required for a
            ``Seq2SeqTransformer`` (the source), encoded once.
        return_scores: also return scores (below).
        return_steps: also return how many decoding steps ran (``<= N``;
            fewer when every row stopped early).

    Returns:
        int32 NumPy array ``(B, N)``: the new tokens only, ``pad_id`` after a
        row's stop id. With ``return_scores=True``, ``(tokens, scores)``:
        ``scores`` float32 ``(B, N)`` is the log-probability of each token
        under the processed logits (0 after a stop id); with :class:`Beam`,
        ``(tokens (B, K, N), scores (B, K))`` are all the beams, best first,
        and their length-penalised scores. With ``return_steps=True``, the
        step count is appended.

    Raises:
        ValueError: an empty prompt batch, a prompt longer than the cache
            (the model's ``max_length``), ``max_new_tokens`` beyond
            ``max_length`` (also with the prompt), stop ids outside the
            vocabulary, a pad between real tokens, a missing
            ``encoder_input_ids``.

    Example:
    ```python
    model = DecoderOnlyLM(vocab_size=50, max_length=32, dim=32, num_heads=4, ff_dim=64,
                          num_layers=2)
    prompt = np.array([[0, 0, 7, 3], [5, 2, 9, 4]], "int32")  # row 0 is left-padded
    tokens = generate(model, prompt, max_new_tokens=10, stop_ids=[1])  # (2, 10)
    ```
    """
    sampler = _get_sampler(sampler)
    vocab_size = _vocab_size(model)
    stop_ids = _int_list(stop_ids, "stop_ids")
    prompt = np.asarray(ops.convert_to_numpy(prompt_ids))
    max_new_tokens = int(max_new_tokens)
    _check(model, prompt, max_new_tokens, stop_ids, vocab_size)
    seq2seq = hasattr(model, "encode")
    if seq2seq and encoder_input_ids is None:
        raise ValueError("Expected `encoder_input_ids` (B, S) for a model with an encoder. "
                         "Received: encoder_input_ids=None")
    if not seq2seq and encoder_input_ids is not None:
        raise ValueError(f"Expected no `encoder_input_ids` for {type(model).__name__} "
                         f"(no encoder). Received: encoder_input_ids of shape "
                         f"{tuple(np.shape(encoder_input_ids))}")
    aligned, pads = _align_left(prompt.astype("int64"), pad_id)
    batch, prompt_len = aligned.shape
    if prompt_len + max_new_tokens > model.max_length:
        raise ValueError(
            f"Expected prompt length + max_new_tokens <= max_length={model.max_length}. "
            f"Received: {prompt_len} + {max_new_tokens} = {prompt_len + max_new_tokens}")
    if not model.built:
        if seq2seq:
            model({"encoder_input_ids": np.asarray(encoder_input_ids)[:, :1],
                   "decoder_input_ids": aligned[:, :1]})
        else:
            model(aligned[:, :1])

    beam = isinstance(sampler, Beam)
    num_beams = sampler.num_beams if beam else 1
    if beam:  # every row becomes K rows: (B * K, ...)
        aligned, pads = np.repeat(aligned, num_beams, 0), np.repeat(pads, num_beams, 0)
        if encoder_input_ids is not None:
            encoder_input_ids = np.repeat(
                np.asarray(ops.convert_to_numpy(encoder_input_ids)), num_beams, 0)
    decoder = _Decoder(model, sampler, logits_processors, stop_ids, pad_id, batch, prompt_len,
                       max_new_tokens, seq2seq, return_scores and not beam)
    key = (repr(sampler), tuple(repr(p) if isinstance(p, LogitsProcessor) else id(p)
                                for p in logits_processors),
           stop_ids, int(pad_id), batch, prompt_len, max_new_tokens, seq2seq,
           decoder.return_scores,
           # New variables (e.g. LoRA enabled later) need a new trace on TensorFlow.
           tuple(id(v) for v in getattr(model, "weights", ())))
    fn = _compiled(model, decoder, key)
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31 - 1))
    args = [ops.convert_to_tensor(aligned, dtype="int32"),
            ops.convert_to_tensor(pads, dtype="int32"),
            ops.convert_to_tensor(int(seed) % (2**31 - 1), dtype="int32")]
    if seq2seq:
        args.append(ops.convert_to_tensor(np.asarray(ops.convert_to_numpy(encoder_input_ids)),
                                          dtype="int32"))
    with _eager_decoding(model):
        result = [np.asarray(ops.convert_to_numpy(x)) for x in fn(*args)]

    if beam:
        out, total, length, steps = result
        score = total / np.maximum(length, 1).astype("float32") ** sampler.length_penalty
        out = out.reshape(batch, num_beams, max_new_tokens)
        score = score.reshape(batch, num_beams)
        order = np.argsort(-score, axis=1, kind="stable")
        out = np.take_along_axis(out, order[:, :, None], axis=1)
        score = np.take_along_axis(score, order, axis=1)
        outputs = (out, score) if return_scores else (out[:, 0],)
    else:
        out, scores, steps = result
        outputs = (out, scores) if return_scores else (out,)
    if return_steps:
        outputs += (int(steps),)
    return outputs[0] if len(outputs) == 1 else outputs
