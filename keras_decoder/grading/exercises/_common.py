"""Small helpers shared by the exercise sets' case generators (NumPy only)."""

import numpy as np

from ..spec import format_value


def label(**kwargs):
    """``"a=1, b=(2, 3)"``: how a case describes its inputs to the learner."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in kwargs.items())


def randint(rng, low, high):
    """A Python int in ``[low, high]`` (inclusive)."""
    return int(rng.integers(low, high + 1))


def lengths_mask(lengths, length):
    """bool ``(B, T)``: ``True`` for the first ``lengths[b]`` positions of row ``b``."""
    return np.arange(length)[None, :] < np.asarray(lengths)[:, None]
