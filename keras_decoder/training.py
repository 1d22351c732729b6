"""Training recipes where padding counts for nothing.

Padded labels must change neither the loss nor the gradients. Keras does this
with ``sample_weight`` (0 on padding) and a reduction that divides by the sum
of the weights (``"mean_with_sample_weight"``), not by the number of tokens,
so that a batch with more padding does not get a smaller loss.
"""

import keras
from keras import ops

__all__ = ["masked_loss", "masked_accuracy", "MaskedAccuracy"]


def masked_loss():
    """Token cross-entropy from logits, averaged over the non-padded labels.

    Use it with a dataset that yields ``(inputs, labels, sample_weight)``,
    such as :func:`keras_decoder.text.seq2seq_dataset`.
    """
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight", name="masked_loss"
    )


def masked_accuracy(y_true, y_pred, pad_id=0):
    """Share of non-padded labels ``(B, T)`` whose argmax over logits ``(B, T, V)`` is right."""
    y_true = ops.convert_to_tensor(y_true)
    predicted = ops.cast(ops.argmax(y_pred, axis=-1), y_true.dtype)
    real = ops.cast(ops.not_equal(y_true, pad_id), "float32")
    right = ops.cast(ops.equal(predicted, y_true), "float32") * real
    return ops.sum(right) / ops.maximum(ops.sum(real), 1.0)


@keras.saving.register_keras_serializable(package="keras_decoder")
class MaskedAccuracy(keras.metrics.Metric):
    """:func:`masked_accuracy` accumulated over batches (counts, not batch means)."""

    def __init__(self, pad_id=0, name="masked_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pad_id = pad_id
        self.right = self.add_variable((), initializer="zeros", name="right")
        self.total = self.add_variable((), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = ops.convert_to_tensor(y_true)
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), y_true.dtype)
        real = ops.cast(ops.not_equal(y_true, self.pad_id), "float32")
        right = ops.cast(ops.equal(predicted, y_true), "float32") * real
        self.right.assign_add(ops.sum(right))
        self.total.assign_add(ops.sum(real))

    def result(self):
        return self.right / ops.maximum(self.total, 1.0)

    def reset_state(self):
        self.right.assign(0.0)
        self.total.assign(0.0)

    def get_config(self):
        return {**super().get_config(), "pad_id": self.pad_id}
