"""Exercise checks, the autograder and the ``keras-decoder`` command line.

For learners, in a notebook::

    from keras_decoder.grading import load_exercise
    ex = load_exercise("03_masks")
    ex.check(causal_mask)        # Correct / Incorrect (with a diagnosis) / Not attempted
    ex.hint("causal_mask", 1)    # graded hints
    ex.solution("causal_mask")   # the reference the grader compares with

For instructors: ``keras-decoder grade submissions/ --json grades.json``.

Modules:

* :mod:`.spec`: the exercise format (questions, cases, mistakes, verdicts);
* :mod:`.registry` and :mod:`.exercises`: the exercise sets, one module each;
* :mod:`.checker`: ``ex.check`` and friends;
* :mod:`.notebooks`: source/learner notebooks, reading submissions;
* :mod:`.runner` and :mod:`._harness`: running a submission in a locked-down kernel;
* :mod:`.grader` and :mod:`.worker`: grading many notebooks, reports;
* :mod:`.cli`: ``keras-decoder``.
"""

from .checker import Exercise, load_exercise
from .registry import exercise_sets, find_exercise_set, get_exercise_set
from .spec import Case, ExerciseSet, Mistake, Outcome, Output, Question, Verdict, evaluate

__all__ = [
    "load_exercise",
    "Exercise",
    "exercise_sets",
    "get_exercise_set",
    "find_exercise_set",
    "ExerciseSet",
    "Question",
    "Case",
    "Mistake",
    "Output",
    "Outcome",
    "Verdict",
    "evaluate",
]


def grade_paths(*args, **kwargs):
    """Grade notebooks; see :func:`keras_decoder.grading.grader.grade_paths`."""
    from .grader import grade_paths as _grade_paths

    return _grade_paths(*args, **kwargs)
