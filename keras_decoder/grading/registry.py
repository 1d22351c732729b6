"""The registry of exercise sets.

Every module ``keras_decoder/grading/exercises/ex*.py`` that defines
``EXERCISE_SET`` is an exercise set. They are discovered on first use, checked
(:func:`~keras_decoder.grading.spec.validate_set`), and must not share ids or
function names.
"""

import importlib
import pkgutil

from . import exercises as _exercises_package
from .spec import validate_set

__all__ = ["exercise_sets", "get_exercise_set", "find_exercise_set"]

_CACHE = {}


def exercise_sets():
    """All registered exercise sets, ``{id: ExerciseSet}``, sorted by id."""
    if not _CACHE:
        found, owners = {}, {}
        for info in sorted(pkgutil.iter_modules(_exercises_package.__path__), key=lambda m: m.name):
            if not info.name.startswith("ex"):
                continue
            module = importlib.import_module(f"{_exercises_package.__name__}.{info.name}")
            exercise_set = getattr(module, "EXERCISE_SET", None)
            if exercise_set is None:
                continue
            validate_set(exercise_set)
            if exercise_set.id in found:
                raise ValueError(f"Two modules register the exercise set {exercise_set.id!r}.")
            for q in exercise_set.questions:
                if q.name in owners:
                    raise ValueError(
                        f"Function names must be unique across exercise sets: {q.name!r} is in "
                        f"{owners[q.name]!r} and {exercise_set.id!r}."
                    )
                owners[q.name] = exercise_set.id
            found[exercise_set.id] = exercise_set
        _CACHE.update(sorted(found.items()))
    return dict(_CACHE)


def get_exercise_set(exercise_id):
    """The exercise set ``exercise_id``; ``KeyError`` naming the known ids if unknown."""
    sets = exercise_sets()
    if exercise_id not in sets:
        raise KeyError(f"Unknown exercise set {exercise_id!r}. Known: {sorted(sets)}")
    return sets[exercise_id]


def find_exercise_set(function_names):
    """The set whose questions best match ``function_names`` (``None`` if none match).

    Function names are unique across sets, so any match is unambiguous unless
    a notebook mixes sets; then the set with the most matches wins.
    """
    names = set(function_names)
    best, best_count = None, 0
    for exercise_set in exercise_sets().values():
        count = sum(q.name in names for q in exercise_set.questions)
        if count > best_count:
            best, best_count = exercise_set, count
    return best
