"""Pretrained models shipped inside the package (no downloads).

``pretrained("tiny-lm")`` loads the small :class:`~keras_decoder.DecoderOnlyLM`
trained by ``scripts/pretrain_tiny_lm.py`` on generated, tagged, monolingual
lines of English and French number words (with and without their digits) and
dates, e.g. ``<en> three hundred and forty-five = 345`` or ``<fr> trois cent
quarante-cinq``. It has never seen an English and a French text on one line,
so it does not translate: that is what lesson 11 fine-tunes it to do.
"""

import collections
from pathlib import Path

__all__ = ["Pretrained", "pretrained", "PRETRAINED_MODELS"]

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"

#: name -> (model file, vocabulary file), both under ``keras_decoder/checkpoints/``.
PRETRAINED_MODELS = {
    "tiny-lm": ("tiny_lm.keras", "tiny_lm_vocab.txt"),
}

Pretrained = collections.namedtuple("Pretrained", ["model", "tokenizer"])
Pretrained.__doc__ = """A pretrained model and the tokenizer it was trained with.

Attributes:
    model: a built ``keras.Model`` (uncompiled), e.g. a ``DecoderOnlyLM``.
    tokenizer: a :class:`keras_decoder.text.Tokenizer`; its ``pad_id``,
        ``start_id`` and ``end_id`` are the ones the model was trained with.

It is a named tuple: ``model, tokenizer = pretrained("tiny-lm")`` works too.
"""


def pretrained(name):
    """Load a pretrained model shipped with the package, on the current backend.

    Args:
        name: one of ``PRETRAINED_MODELS`` (``"tiny-lm"``).

    Returns:
        ``Pretrained(model, tokenizer)``, a named tuple. Each call loads a fresh
        copy, so fine-tuning one does not change the next.

    Example::

        model, tokenizer = keras_decoder.pretrained("tiny-lm")
        ids = tokenizer.tokenize(["<en> one hundred and twelve"], add_start_end=True)
        logits = model(ids.to_tensor())   # (1, T, vocab_size)

    The tokenizer needs TensorFlow and tensorflow-text
    (``pip install 'keras-decoder[text]'``); the model itself runs on any backend.
    """
    if name not in PRETRAINED_MODELS:
        raise ValueError(
            f"Expected a pretrained model name in {sorted(PRETRAINED_MODELS)}. "
            f"Received: name={name!r}"
        )
    import keras

    from keras_decoder import models  # noqa: F401  (registers the classes)
    from keras_decoder.text import Tokenizer

    model_file, vocab_file = (CHECKPOINTS / f for f in PRETRAINED_MODELS[name])
    if not model_file.exists():
        raise FileNotFoundError(
            f"{model_file} is missing: the package was installed without its checkpoints. "
            "Rebuild it with `python scripts/pretrain_tiny_lm.py`."
        )
    model = keras.saving.load_model(model_file, compile=False)
    return Pretrained(model=model, tokenizer=Tokenizer(vocab_file))
