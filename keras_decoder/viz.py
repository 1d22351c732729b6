"""Plots for masks and attention weights (matplotlib).

A mask is easier to read as a picture than as a table of booleans: rows are
queries (who is looking), columns are keys (what may be looked at).
"""

import numpy as np
from keras import ops

__all__ = ["plot_mask", "plot_attention"]


def _as_numpy(x):
    if isinstance(x, np.ndarray):
        return x
    try:
        return ops.convert_to_numpy(x)
    except Exception:
        return np.asarray(x)


def _labels(ax, query_labels, key_labels, shape):
    rows, cols = shape
    if key_labels is not None:
        if len(key_labels) != cols:
            raise ValueError(
                f"Expected {cols} key labels (one per column). Received: {len(key_labels)}"
            )
        ax.set_xticks(range(cols), [str(k) for k in key_labels], rotation=90)
    if query_labels is not None:
        if len(query_labels) != rows:
            raise ValueError(
                f"Expected {rows} query labels (one per row). Received: {len(query_labels)}"
            )
        ax.set_yticks(range(rows), [str(q) for q in query_labels])


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(4, 4))
    return ax


def plot_mask(mask, query_labels=None, key_labels=None, title=None, ax=None):
    """Draw a boolean mask ``(query_len, key_len)`` as a grid.

    Dark cells are ``True`` (this query may attend to this key), light cells
    are ``False`` (blocked). Rows are queries, columns are keys.

    Args:
        mask: bool ``(Tq, Tk)``, or ``(1, Tq, Tk)`` / ``(1, 1, Tq, Tk)``
            (leading axes of size 1 are dropped). Any backend tensor or array.
        query_labels: optional ``Tq`` labels for the rows (tokens).
        key_labels: optional ``Tk`` labels for the columns.
        title: optional title.
        ax: optional matplotlib Axes to draw into.

    Returns:
        The matplotlib Axes.
    """
    m = _as_numpy(mask)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(
            "Expected a mask of shape (query_len, key_len) (leading axes of size 1 "
            f"are allowed). Received: mask.shape={_as_numpy(mask).shape}"
        )
    ax = _axes(ax)
    ax.imshow(m.astype(bool), cmap="Blues", vmin=-0.25, vmax=1.0, interpolation="nearest")
    rows, cols = m.shape
    ax.set_xticks(np.arange(-0.5, cols, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, rows, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    _labels(ax, query_labels, key_labels, m.shape)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    if title:
        ax.set_title(title)
    return ax


def plot_attention(weights, query_labels=None, key_labels=None, title=None, ax=None):
    """Draw attention weights ``(query_len, key_len)`` as a heatmap; returns the Axes."""
    w = _as_numpy(weights).astype("float32")
    while w.ndim > 2 and w.shape[0] == 1:
        w = w[0]
    if w.ndim != 2:
        raise ValueError(
            "Expected weights of shape (query_len, key_len). "
            f"Received: weights.shape={_as_numpy(weights).shape}"
        )
    ax = _axes(ax)
    image = ax.imshow(w, cmap="viridis", vmin=0.0, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, fraction=0.046)
    _labels(ax, query_labels, key_labels, w.shape)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    return ax
