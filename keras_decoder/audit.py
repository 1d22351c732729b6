"""Leakage audits: does a model look where it must not?

Two bugs that training does not reveal, because the loss still goes down:

* **causal leakage**: the output at position ``t`` depends on tokens after
  ``t`` (a missing or misaligned causal mask). The model "cheats" in training
  and falls apart when it generates one token at a time.
* **padding leakage**: the output at a real token depends on the padding
  (a key padding mask that is missing, or a mean over all positions). The
  same sentence then gives different results in different batches.

Both audits treat the model as a black box: they change the input, call the
model again, and measure the largest change of the outputs at the positions
that must not move. They work on any Keras model (or callable) that takes
token ids ``(B, T)``, or a dict / list of inputs some of which are token ids.

How the padding is changed: padding is *defined* by the ids (``id == pad_id``)
unless the inputs carry an explicit padding mask, so "what sits under the
padding" cannot be changed without changing what is padding. The audit
therefore changes the **amount** of padding: it appends pad columns
(``"extend"``) and drops all-padding columns at the end (``"trim"``). With an
explicit padding mask input (a key with ``"mask"`` in its name, such as
KerasHub's ``padding_mask``) it also puts random ids under the padding
(``"content"``). A model that masks padding keys gives the same outputs at
every real position; a model that averages over padding does not.

Example:
```python
report = audit_causal_leakage(model, token_ids)
assert report.passed, report
report = audit_padding_leakage(model, {"encoder_input_ids": src, "decoder_input_ids": tgt})
print(report.max_change, report.where)
```
"""

import dataclasses
import inspect

import keras
import numpy as np

__all__ = ["LeakageReport", "audit_causal_leakage", "audit_padding_leakage"]

_SINGLE = "inputs"  # the key of a model's only input
_DECODER_HINTS = ("decoder", "target", "tgt", "label", "token_ids", "input_ids")
_ENCODER_HINTS = ("encoder", "source", "src", "context", "memory")


@dataclasses.dataclass
class LeakageReport:
    """What an audit found.

    Attributes:
        kind: ``"causal"`` or ``"padding"``.
        passed: ``max_change <= tolerance``.
        max_change: the largest absolute change at a position that must not
            change.
        where: where ``max_change`` happened: a dict with ``input`` (the input
            that was changed), ``perturbation``, ``output`` (index of the output
            in ``keras.tree.flatten`` order), ``batch`` and ``position`` (and
            ``changed_after`` for the causal audit); ``None`` if nothing changed.
        tolerance: the threshold used.
        checks: the perturbations that were run, e.g. ``"extend decoder_input_ids by 3"``.
        skipped: perturbations that could not run, with the reason.
    """

    kind: str
    passed: bool
    max_change: float
    where: dict | None
    tolerance: float
    checks: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def __str__(self):
        verdict = "PASSED" if self.passed else "FAILED"
        text = (f"{self.kind} leakage audit {verdict}: max change {self.max_change:.3g} "
                f"(tolerance {self.tolerance:.3g})")
        if self.where is not None and self.max_change > 0:
            text += f" at {self.where}"
        return text


# ---------------------------------------------------------------------------
# Inputs as a flat {key: np.ndarray} and back.
# ---------------------------------------------------------------------------
def _flatten(inputs):
    if isinstance(inputs, dict):
        return {k: np.asarray(keras.ops.convert_to_numpy(v)) for k, v in inputs.items()}, "dict"
    if isinstance(inputs, (list, tuple)):
        flat = {i: np.asarray(keras.ops.convert_to_numpy(v)) for i, v in enumerate(inputs)}
        return flat, type(inputs)
    return {_SINGLE: np.asarray(keras.ops.convert_to_numpy(inputs))}, "single"


def _unflatten(flat, kind):
    if kind == "dict":
        return dict(flat)
    if kind == "single":
        return flat[_SINGLE]
    return kind(flat[i] for i in range(len(flat)))


def _is_mask_key(key, value):
    return value.dtype == bool or (isinstance(key, str) and "mask" in key.lower())


def _token_keys(flat):
    """Keys of the inputs that hold token ids: integer arrays ``(B, T)``."""
    return [k for k, v in flat.items()
            if v.ndim == 2 and np.issubdtype(v.dtype, np.integer) and not _is_mask_key(k, v)]


def _prefix(key):
    """``"encoder_padding_mask"`` and ``"encoder_input_ids"`` share ``"encoder"``."""
    key = str(key).lower()
    for suffix in ("padding_mask", "attention_mask", "mask", "input_ids", "token_ids", "ids"):
        if key.endswith(suffix):
            return key[: -len(suffix)].strip("_")
    return key


def _mask_keys(flat, token_keys):
    """Pair each token input with its explicit padding mask input, if any."""
    masks = [k for k, v in flat.items() if v.ndim == 2 and _is_mask_key(k, v)]
    if len(token_keys) == 1 and len(masks) == 1:
        return {token_keys[0]: masks[0]}
    pairs = {}
    for key in token_keys:
        same = [m for m in masks if _prefix(m) == _prefix(key)]
        if len(same) == 1:
            pairs[key] = same[0]
    return pairs


def _real(flat, key, mask_keys, pad_id):
    """bool ``(B, T)``: which positions of input ``key`` are real tokens."""
    if key in mask_keys:
        return flat[mask_keys[key]].astype(bool)
    return flat[key] != pad_id


# ---------------------------------------------------------------------------
# Calling the model.
# ---------------------------------------------------------------------------
def _accepts_training(model):
    if isinstance(model, keras.layers.Layer):
        return True
    try:
        return "training" in inspect.signature(model).parameters
    except (TypeError, ValueError):
        return False


def _run(model, flat, kind):
    inputs = _unflatten(flat, kind)
    outputs = model(inputs, training=False) if _accepts_training(model) else model(inputs)
    return [np.asarray(keras.ops.convert_to_numpy(o), dtype=np.float64)
            for o in keras.tree.flatten(outputs)]


class _Tracker:
    """Keeps the largest change and where it happened."""

    def __init__(self):
        self.max_change, self.where = 0.0, None

    def update(self, diff, valid, info):
        """``diff``: ``|new - old|`` ``(B, T, ...)``; ``valid``: bool ``(B, T)``."""
        if diff.size == 0:
            return
        diff = diff.reshape(diff.shape[:2] + (-1,)).max(axis=-1) if diff.ndim > 2 else diff
        if diff.ndim == 1:  # (B,) pooled outputs: no positions
            diff = diff[:, None]
        diff = np.where(valid, diff, 0.0) if valid is not None else diff
        diff = np.nan_to_num(diff, nan=np.inf)
        b, t = np.unravel_index(int(np.argmax(diff)), diff.shape)
        if diff[b, t] > self.max_change or self.where is None:
            self.max_change = float(diff[b, t])
            self.where = {**info, "batch": int(b), "position": int(t)}


def _random_ids(rng, original, vocab_size, pad_id):
    """Ids in ``[0, vocab_size)``, never ``pad_id``, different from ``original`` when possible."""
    choices = np.array([i for i in range(vocab_size) if i != pad_id])
    if choices.size == 0:
        raise ValueError(f"Expected vocab_size >= 2 to draw non-pad ids. Received: {vocab_size}")
    new = rng.choice(choices, size=original.shape)
    if choices.size > 1:  # redraw the ones that did not change
        same = new == original
        while same.any():
            new[same] = rng.choice(choices, size=int(same.sum()))
            same = new == original
    return new.astype(original.dtype)


def _vocab_size(ids, vocab_size, pad_id):
    """Replacement ids come from ``[0, vocab_size)``; default: the ids seen."""
    if vocab_size is not None:
        return int(vocab_size)
    return max(int(ids.max()) + 1, pad_id + 2, 2)


# ---------------------------------------------------------------------------
# Which input is a given output aligned with?
# ---------------------------------------------------------------------------
def _pick_by_name(candidates):
    named = [k for k in candidates if isinstance(k, str)]
    if len(named) != len(candidates):
        return None
    for hints, keep in ((_ENCODER_HINTS, False), (_DECODER_HINTS, True)):
        chosen = [k for k in candidates if any(h in k.lower() for h in hints) == keep]
        if len(chosen) == 1:
            return chosen[0]
    return None


def _aligned_input(output, flat, token_keys, model, kind, base_len_cache):
    """The token input whose length is the output's axis 1, or ``None``."""
    if output.ndim < 2:
        return None
    candidates = [k for k in token_keys if flat[k].shape[1] == output.shape[1]]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    by_name = _pick_by_name(candidates)
    if by_name is not None:
        return by_name
    # Probe: append one pad column to each candidate and see which output grows.
    for key in candidates:
        if key not in base_len_cache:
            probe = dict(flat)
            probe[key] = np.concatenate([flat[key], flat[key][:, -1:]], axis=1)
            try:
                base_len_cache[key] = [o.shape[1:2] for o in _run(model, probe, kind)]
            except Exception:  # noqa: BLE001 - a model may reject longer inputs
                base_len_cache[key] = None
        lengths = base_len_cache[key]
        if lengths and any(len(s) and s[0] == output.shape[1] + 1 for s in lengths):
            return key
    return None


# ---------------------------------------------------------------------------
# The causal audit.
# ---------------------------------------------------------------------------
def audit_causal_leakage(model, inputs, positions=None, *, key=None, pad_id=0,
                         vocab_size=None, tolerance=1e-4, seed=0):
    """Change the tokens after position ``p``; outputs up to ``p`` must not move.

    For each ``p`` in ``positions``, every token at ``p + 1, p + 2, ...`` is
    replaced by a random non-pad id and the model is called again. The largest
    change of any output at the real (non-pad) positions ``<= p`` is recorded.
    Outputs at padded positions are not compared: they are computed but
    dropped by the loss mask (``keras.layers.MultiHeadAttention``, for one,
    averages over *every* key in a padded query row, the future included).

    Args:
        model: a Keras model (or callable) taking ``inputs``.
        inputs: int token ids ``(B, T)``, or a dict / list of inputs.
        positions: the ``p`` to test; default every position ``0 .. T-2``
            (16 spread-out positions when ``T > 32``).
        key: which input is the causal (decoder) sequence, for dict/list
            inputs. By default: the token input whose length matches the
            outputs' axis 1, preferring names with ``decoder``/``target`` over
            ``encoder``/``source``.
        pad_id: never drawn as a replacement id.
        vocab_size: replacement ids are drawn from ``[0, vocab_size)``;
            default ``max(ids) + 1``.
        tolerance: the largest allowed absolute change.
        seed: seed of the replacement ids.

    Returns:
        A :class:`LeakageReport`.
    """
    flat, kind = _flatten(inputs)
    token_keys = _token_keys(flat)
    if not token_keys:
        raise ValueError(
            "Expected at least one input of integer token ids of shape (batch, seq_len). "
            f"Received: inputs with shapes {{{', '.join(f'{k}: {v.shape}' for k, v in flat.items())}}}"
        )
    base = _run(model, flat, kind)
    if key is None:
        sequence_outputs = [o for o in base if o.ndim >= 2]
        found = {_aligned_input(o, flat, token_keys, model, kind, {}) for o in sequence_outputs}
        found.discard(None)
        if len(found) != 1:
            raise ValueError(
                "Could not tell which input is the causal sequence: pass `key=`. "
                f"Received: token inputs {token_keys}, output shapes {[o.shape for o in base]}"
            )
        key = found.pop()
    if key not in flat:
        raise ValueError(f"Expected `key` to be one of {list(flat)}. Received: key={key!r}")
    ids = flat[key]
    length = ids.shape[1]
    if positions is None:
        positions = range(length - 1) if length <= 32 else np.linspace(0, length - 2, 16).astype(int)
    positions = sorted({int(p) for p in positions})
    if any(p < 0 or p >= length for p in positions):
        raise ValueError(f"Expected positions in [0, {length}). Received: positions={positions}")
    vocab = _vocab_size(ids, vocab_size, pad_id)
    rng = np.random.default_rng(seed)
    aligned = [o.ndim >= 2 and o.shape[1] == length for o in base]
    if not any(aligned):
        raise ValueError(
            f"Expected an output with the sequence length {length} of input {key!r} on axis 1. "
            f"Received: output shapes {[o.shape for o in base]}"
        )

    real = ids != pad_id  # padded query positions are not compared: the loss drops them
    tracker, checks = _Tracker(), []
    for p in positions:
        if p == length - 1:
            continue  # nothing after the last position
        changed = dict(flat)
        changed[key] = ids.copy()
        changed[key][:, p + 1:] = _random_ids(rng, ids[:, p + 1:], vocab, pad_id)
        outputs = _run(model, changed, kind)
        checks.append(f"change {key} after position {p}")
        for index, (old, new) in enumerate(zip(base, outputs)):
            if not aligned[index]:
                continue
            diff = np.abs(new[:, : p + 1] - old[:, : p + 1])
            tracker.update(diff, real[:, : p + 1], {"input": key, "perturbation": "future tokens",
                                        "changed_after": p, "output": index})
    return LeakageReport("causal", tracker.max_change <= tolerance, tracker.max_change,
                         tracker.where, tolerance, checks)


# ---------------------------------------------------------------------------
# The padding audit.
# ---------------------------------------------------------------------------
def _pad_columns(array, count, value):
    filler = np.full((array.shape[0], count), value, dtype=array.dtype)
    return np.concatenate([array, filler], axis=1)


def _perturbations(flat, key, mask_keys, pad_id, extra, rng, vocab):
    """Yield ``(name, changed_inputs, kept_length)`` for one token input."""
    ids, mask_key = flat[key], mask_keys.get(key)
    real = _real(flat, key, mask_keys, pad_id)
    length = ids.shape[1]

    changed = dict(flat)
    changed[key] = _pad_columns(ids, extra, pad_id)
    if mask_key is not None:
        changed[mask_key] = _pad_columns(flat[mask_key], extra, 0)
    yield f"extend {key} by {extra} pad columns", changed, length

    trailing = 0
    while trailing < length - 1 and not real[:, length - 1 - trailing].any():
        trailing += 1
    if trailing:
        keep = length - trailing
        changed = dict(flat)
        changed[key] = ids[:, :keep]
        if mask_key is not None:
            changed[mask_key] = flat[mask_key][:, :keep]
        yield f"trim {trailing} all-padding columns of {key}", changed, keep

    if mask_key is not None and (~real).any():
        changed = dict(flat)
        changed[key] = np.where(real, ids, _random_ids(rng, ids, vocab, pad_id))
        yield f"random ids under the padding of {key}", changed, length


def audit_padding_leakage(model, inputs, pad_id=0, *, extra=3, vocab_size=None,
                          tolerance=1e-4, seed=0):
    """Change the padding; outputs at real tokens must not move.

    For each token input (each of ``encoder_input_ids`` and
    ``decoder_input_ids`` in a seq2seq dict), the audit:

    * appends ``extra`` pad columns (``"extend"``);
    * drops the columns at the end that are padding in every row (``"trim"``);
    * with an explicit padding mask input, draws random ids under the padding
      (``"content"``).

    It then compares every output at the real positions of the input it is
    aligned with (an output's axis 1 is matched to the token input of that
    length; an output without a sequence axis is compared whole).

    Args:
        model: a Keras model (or callable) taking ``inputs``.
        inputs: int token ids ``(B, T)``, or a dict / list of inputs. Padding
            is ``id == pad_id``, or ``False`` in a paired mask input (a key
            with ``mask`` in its name: ``padding_mask`` pairs with the only
            token input, ``encoder_padding_mask`` with ``encoder_input_ids``).
        pad_id: the padding id.
        extra: how many pad columns to append.
        vocab_size: random ids (``"content"``) come from ``[0, vocab_size)``.
        tolerance: the largest allowed absolute change.
        seed: seed of the random ids.

    Returns:
        A :class:`LeakageReport`. A perturbation the model rejects (say, an
        input longer than its ``max_length``) is listed in ``skipped``; if none
        can run, ``ValueError`` is raised.
    """
    flat, kind = _flatten(inputs)
    token_keys = _token_keys(flat)
    if not token_keys:
        raise ValueError(
            "Expected at least one input of integer token ids of shape (batch, seq_len). "
            f"Received: inputs with shapes {{{', '.join(f'{k}: {v.shape}' for k, v in flat.items())}}}"
        )
    mask_keys = _mask_keys(flat, token_keys)
    rng = np.random.default_rng(seed)
    base = _run(model, flat, kind)
    probes = {}
    alignment = [_aligned_input(o, flat, token_keys, model, kind, probes) for o in base]

    tracker, checks, skipped = _Tracker(), [], []
    for key in token_keys:
        vocab = _vocab_size(flat[key], vocab_size, pad_id)
        for name, changed, kept in _perturbations(flat, key, mask_keys, pad_id, extra, rng, vocab):
            try:
                outputs = _run(model, changed, kind)
            except Exception as error:  # noqa: BLE001 - report, do not crash
                skipped.append(f"{name}: {type(error).__name__}: {str(error)[:200]}")
                continue
            checks.append(name)
            for index, (old, new) in enumerate(zip(base, outputs)):
                target = alignment[index]
                if target is None or old.ndim < 2:
                    valid, old_part, new_part = None, old, new
                    if old.shape != new.shape:
                        skipped.append(f"{name}: output {index} changed shape "
                                       f"{old.shape} -> {new.shape}")
                        continue
                else:
                    # Compare the positions of ``target`` that are real and
                    # exist in both runs.
                    n = min(old.shape[1], new.shape[1], kept if target == key else old.shape[1])
                    valid = _real(flat, target, mask_keys, pad_id)[:, :n]
                    old_part, new_part = old[:, :n], new[:, :n]
                diff = np.abs(new_part - old_part)
                if old_part.ndim == 1 or (valid is None and old_part.ndim >= 2):
                    diff = diff.reshape(diff.shape[0], -1)
                    diff = diff.max(axis=1, keepdims=True) if diff.size else diff
                tracker.update(diff, valid, {"input": key, "perturbation": name, "output": index})
    if not checks:
        raise ValueError(
            "The padding audit could not run any perturbation. Reasons: " + "; ".join(skipped)
        )
    return LeakageReport("padding", tracker.max_change <= tolerance, tracker.max_change,
                         tracker.where, tolerance, checks, skipped)
