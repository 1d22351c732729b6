"""Generated datasets: real sequence-to-sequence tasks with no downloads.

The article's example task is machine translation. These generators give two
small translation tasks that a CPU can learn in minutes, built from locale data
that ships with Python packages (Babel's CLDR tables and ``num2words``):

* :func:`dates`: a date written by a person, in one of several languages and
  styles, to its ISO form (``"mardi 3 mars 1998"`` -> ``"1998-03-03"``);
* :func:`number_words`: a number in words in one language to the same number
  in another (``"one hundred and twelve"`` -> ``"cent douze"``), which needs
  reordering and changes length.

Both are deterministic given ``seed``. :func:`split` cuts a list of pairs into
train/validation/test parts that share no source string.
"""

import datetime
import random

__all__ = ["dates", "number_words", "split", "DATE_FORMATS", "NUMBER_LANGUAGES"]

DATE_FORMATS = ("full", "long", "medium", "short")
NUMBER_LANGUAGES = ("en", "fr", "de", "es", "digits")

# Two-digit years ("3/3/98") are unambiguous inside one century-wide window.
_FIRST_DAY = datetime.date(1950, 1, 1)
_LAST_DAY = datetime.date(2049, 12, 31)


def _babel_dates():
    try:
        from babel import dates as babel_dates
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "keras_decoder.data.dates needs Babel: pip install 'keras-decoder[data]'"
        ) from error
    return babel_dates


def dates(n, languages=("en", "fr", "de", "zh"), seed=0):
    """``n`` pairs ``(human-written date, ISO date)``.

    Each pair draws a day between 1950-01-01 and 2049-12-31, a language from
    ``languages`` (any locale Babel knows) and a CLDR format from
    ``DATE_FORMATS``: full (``"Tuesday, March 3, 1998"``), long
    (``"3 mars 1998"``), medium (``"03.03.1998"``) or short numeric
    (``"1998/3/3"``). The window is 100 years wide so that two-digit years are
    unambiguous.

    Args:
        n: number of pairs.
        languages: locale codes.
        seed: the random seed; the same seed gives the same pairs.

    Returns:
        A list of ``(source, target)`` string pairs.
    """
    if not languages:
        raise ValueError(f"Expected at least one language. Received: languages={languages!r}")
    babel_dates = _babel_dates()
    rng = random.Random(seed)
    span = (_LAST_DAY - _FIRST_DAY).days
    pairs = []
    for _ in range(int(n)):
        day = _FIRST_DAY + datetime.timedelta(days=rng.randrange(span + 1))
        language = rng.choice(tuple(languages))
        style = rng.choice(DATE_FORMATS)
        text = babel_dates.format_date(day, format=style, locale=language)
        pairs.append((text, day.isoformat()))
    return pairs


def _num2words():
    try:
        from num2words import num2words
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "keras_decoder.data.number_words needs num2words: pip install 'keras-decoder[data]'"
        ) from error
    return num2words


def _say(number, language, num2words):
    return str(number) if language == "digits" else num2words(number, lang=language)


def number_words(n, source="en", target="fr", seed=0):
    """``n`` pairs ``(number in source, number in target)``.

    Numbers are spread evenly over their count of digits (1 to 6), so that
    small and large numbers are equally common. ``source`` and ``target`` are
    two different entries of ``NUMBER_LANGUAGES`` (en, fr, de, es, digits).

    Returns:
        A list of ``(source, target)`` string pairs, e.g.
        ``("one thousand, two hundred and thirty-four",
        "mille deux cent trente-quatre")``.
    """
    for name, value in (("source", source), ("target", target)):
        if value not in NUMBER_LANGUAGES:
            raise ValueError(f"Expected {name} in {NUMBER_LANGUAGES}. Received: {name}={value!r}")
    if source == target:
        raise ValueError(
            f"Expected two different languages. Received: source={source!r}, target={target!r}"
        )
    num2words = _num2words()
    rng = random.Random(seed)
    pairs = []
    for _ in range(int(n)):
        digits = rng.randint(1, 6)
        number = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)
        pairs.append((_say(number, source, num2words), _say(number, target, num2words)))
    return pairs


def split(pairs, fractions=(0.8, 0.1, 0.1), seed=0):
    """Deterministic splits that share no source string.

    All pairs with the same source go to the same split (a duplicated source in
    train and test would inflate the test score). Sources are shuffled with
    ``seed``, then cut by ``fractions`` of the number of distinct sources.

    Args:
        pairs: a list of ``(source, target)`` pairs.
        fractions: non-negative fractions that sum to 1, one per split.
        seed: the shuffle seed.

    Returns:
        A tuple of lists of pairs, one per fraction, in order.
    """
    fractions = tuple(float(f) for f in fractions)
    if not fractions or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"Expected non-negative fractions that sum to 1. Received: fractions={fractions}"
        )
    groups = {}
    for pair in pairs:
        groups.setdefault(pair[0], []).append(pair)
    sources = sorted(groups)
    random.Random(seed).shuffle(sources)
    bounds, total = [], 0.0
    for f in fractions:
        total += f
        bounds.append(round(total * len(sources)))
    bounds[-1] = len(sources)
    parts, start = [], 0
    for end in bounds:
        parts.append([pair for s in sources[start:end] for pair in groups[s]])
        start = end
    return tuple(parts)
