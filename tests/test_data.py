"""keras_decoder.data: generated pairs, deterministic, and leak-free splits."""

import datetime
import re

import pytest

from keras_decoder import data


def test_dates_are_deterministic_and_correct():
    pairs = data.dates(300, seed=7)
    assert pairs == data.dates(300, seed=7)
    assert pairs != data.dates(300, seed=8)
    for source, target in pairs:
        day = datetime.date.fromisoformat(target)
        assert datetime.date(1950, 1, 1) <= day <= datetime.date(2049, 12, 31)
        # The day of the month is written in the source (as 3 or 03).
        assert re.search(rf"(?<!\d)0?{day.day}(?!\d)", source), (source, target)


def test_dates_use_every_language_and_format():
    pairs = data.dates(400, languages=("en", "fr", "de", "zh"), seed=0)
    sources = [s for s, _ in pairs]
    assert any(re.search(r"[年月日]", s) for s in sources)  # zh
    assert any(re.search(r"\b(janvier|février|mars|avril|mai|juin|juillet|août|septembre|octobre|novembre|décembre)\b", s) for s in sources)
    assert any(re.search(r"(Januar|Februar|März|Mai|Juni|Juli|Oktober|Dezember)", s) for s in sources)
    assert any(re.fullmatch(r"\d{1,2}/\d{1,2}/\d{2}", s) for s in sources)  # en short
    assert any(re.search(r"(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)", s) for s in sources)


def test_the_seed_example_from_the_issue():
    from babel.dates import format_date

    assert format_date(datetime.date(1998, 3, 3), format="full", locale="fr") == "mardi 3 mars 1998"


def test_number_words_translate_numbers():
    pairs = data.number_words(200, source="digits", target="fr", seed=3)
    assert pairs == data.number_words(200, source="digits", target="fr", seed=3)
    from num2words import num2words

    for digits, words in pairs:
        assert words == num2words(int(digits), lang="fr")
    lengths = {len(d) for d, _ in pairs}
    assert lengths == {1, 2, 3, 4, 5, 6}
    en_fr = dict(data.number_words(50, "en", "fr", seed=1))
    assert all(isinstance(k, str) and k and v for k, v in en_fr.items())


@pytest.mark.parametrize("source, target", [("en", "en"), ("xx", "fr"), ("en", "it")])
def test_number_words_rejects_bad_languages(source, target):
    with pytest.raises(ValueError, match=rf"Received: .*{source if source == 'xx' else target}"):
        data.number_words(3, source=source, target=target)


def test_split_is_deterministic_and_shares_no_source():
    pairs = data.dates(2000, seed=1) + data.dates(200, seed=1)  # duplicated sources on purpose
    train, valid, test = data.split(pairs, (0.8, 0.1, 0.1), seed=5)
    assert (train, valid, test) == data.split(pairs, (0.8, 0.1, 0.1), seed=5)
    assert len(train) + len(valid) + len(test) == len(pairs)
    sets = [{s for s, _ in part} for part in (train, valid, test)]
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    distinct = len({s for s, _ in pairs})
    assert abs(len(sets[0]) - 0.8 * distinct) <= 1
    assert data.split(pairs, (0.8, 0.1, 0.1), seed=6) != (train, valid, test)


@pytest.mark.parametrize("fractions", [(0.5, 0.6), (1.2, -0.2), ()])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match=r"sum to 1.*Received"):
        data.split([("a", "b")], fractions, seed=0)
