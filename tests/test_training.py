"""Padding counts for nothing: loss, gradients and accuracy ignore padded labels."""

import keras
import numpy as np
from keras import ops

from backend_info import BACKEND, JIT_BACKENDS
from keras_decoder.models import DecoderOnlyLM
from keras_decoder.training import MaskedAccuracy, masked_accuracy, masked_loss


def _model():
    model = DecoderOnlyLM(vocab_size=23, max_length=8, dim=16, num_heads=2, ff_dim=32, num_layers=1)
    model.build((None, 8))
    return model


def _step(weights, ids, labels, weight):
    """One SGD step from the given weights; returns (loss, weights after)."""
    model = _model()
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss=masked_loss(),
                  jit_compile=BACKEND in JIT_BACKENDS)
    loss = model.train_on_batch(ids, labels, sample_weight=weight)
    return float(np.asarray(loss).reshape(-1)[0]), [np.asarray(w) for w in model.get_weights()]


def test_changing_padded_labels_changes_neither_loss_nor_gradients(rng):
    ids = rng.integers(1, 23, size=(4, 8)).astype("int32")
    labels = rng.integers(1, 23, size=(4, 8)).astype("int32")
    weight = (rng.random((4, 8)) > 0.4).astype("float32")
    weight[:, 0] = 1.0
    labels[weight == 0] = 0  # padded labels
    other = labels.copy()
    other[weight == 0] = rng.integers(1, 23, size=int((weight == 0).sum()))  # garbage under padding
    start = [np.asarray(w) for w in _model().get_weights()]
    loss_a, after_a = _step(start, ids, labels, weight)
    loss_b, after_b = _step(start, ids, other, weight)
    assert np.isfinite(loss_a)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b, s in zip(after_a, after_b, start):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(a, s) for a, s in zip(after_a, start))  # the step did something
    # ... while a label that is *not* padded does change the loss (the test can fail).
    changed = labels.copy()
    changed[0, 0] = (labels[0, 0] % 22) + 1
    loss_c, _ = _step(start, ids, changed, weight)
    assert abs(loss_c - loss_a) > 1e-6


def test_loss_divides_by_the_weight_sum_not_the_token_count(rng):
    logits = rng.normal(size=(2, 5, 7)).astype("float32")
    labels = rng.integers(0, 7, size=(2, 5)).astype("int32")
    weight = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], "float32")
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    expected = (nll * weight).sum() / weight.sum()
    got = float(ops.convert_to_numpy(masked_loss()(labels, logits, sample_weight=weight)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_masked_accuracy_ignores_padding(rng):
    logits = rng.normal(size=(3, 6, 9)).astype("float32")
    labels = rng.integers(1, 9, size=(3, 6)).astype("int32")
    labels[:, 4:] = 0
    predicted = logits.argmax(-1)
    expected = ((predicted == labels) & (labels != 0)).sum() / (labels != 0).sum()
    np.testing.assert_allclose(float(ops.convert_to_numpy(masked_accuracy(labels, logits))), expected, rtol=1e-6)
    # All right on real tokens and wrong on padding: still 100%.
    perfect = np.eye(9, dtype="float32")[labels] * 10
    perfect[:, 4:] = np.eye(9, dtype="float32")[3] * 10
    assert float(ops.convert_to_numpy(masked_accuracy(labels, perfect))) == 1.0


def test_masked_accuracy_metric_accumulates_counts_over_batches(rng):
    metric = MaskedAccuracy()
    right = total = 0
    for real in (1, 6):  # a batch with 1 real label and one with 6: counts, not batch means
        labels = np.zeros((1, 6), "int32")
        labels[0, :real] = rng.integers(1, 5, size=real)
        logits = rng.normal(size=(1, 6, 5)).astype("float32")
        metric.update_state(labels, logits)
        right += int(((logits.argmax(-1) == labels) & (labels != 0)).sum())
        total += real
    np.testing.assert_allclose(float(ops.convert_to_numpy(metric.result())), right / total, rtol=1e-6)
