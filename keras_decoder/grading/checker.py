"""In-notebook feedback: ``ex = load_exercise("03_masks")``, then ``ex.check(fn)``.

``ex.check`` calls the learner's function on fresh random inputs, in the
learner's own kernel, and prints one of

* **Correct**;
* **Incorrect**, with the name of the recognised mistake and what to fix, and
  the first input where the answer is wrong (expected vs. got);
* **Not attempted**, while the function still raises ``NotImplementedError``.

It never raises, so a learner notebook runs top to bottom at any stage; the
one exception is nbgrader's autograder (``NBGRADER_EXECUTION`` set), where a
wrong answer raises ``AssertionError`` so that nbgrader withholds the points.

This is self-checking for learning, not grading: the learner's code runs in
the learner's process and can do anything to it. Instructors grade with
``keras-decoder grade`` (see :mod:`keras_decoder.grading.grader`).
"""

import inspect
import os
import sys

import numpy as np

from ._harness import describe_exception, to_array
from .registry import exercise_sets, get_exercise_set
from .spec import Outcome, evaluate

__all__ = ["Exercise", "load_exercise"]

_LABELS = {
    "correct": "Correct",
    "incorrect": "Incorrect",
    "error": "Incorrect",
    "not_attempted": "Not attempted",
    "timeout": "Timed out",
}


def run_cases(fn, cases):
    """Call ``fn`` on each case in this process; return one :class:`Outcome` per case."""
    outcomes = []
    for case in cases:
        try:
            with np.errstate(all="ignore"):
                out = case.call(fn)
        except NotImplementedError:
            outcomes.append(Outcome("not_implemented"))
            continue
        except (Exception, SystemExit) as exc:
            outcomes.append(Outcome("error", error=describe_exception(exc)))
            continue
        try:
            outcomes.append(Outcome("ok", value=to_array(out)))
        except TypeError as exc:
            outcomes.append(Outcome("bad_output", error=str(exc)))
        except Exception as exc:
            outcomes.append(Outcome("bad_output", error=f"returned a value that cannot be read ({describe_exception(exc)})"))
    return outcomes


def _nbgrader_running():
    return os.environ.get("NBGRADER_EXECUTION", "") in ("autograde", "validate")


class Exercise:
    """The checker for one exercise set; see the module docstring.

    Args:
        exercise_set: an :class:`~keras_decoder.grading.spec.ExerciseSet`.
        seed: seed the random inputs (default: fresh inputs every check).
    """

    def __init__(self, exercise_set, seed=None):
        self.exercise_set = exercise_set
        self._seed = seed

    # -- helpers -------------------------------------------------------------
    @property
    def questions(self):
        """The questions of this set."""
        return self.exercise_set.questions

    def _question(self, name_or_fn):
        name = name_or_fn if isinstance(name_or_fn, str) else getattr(name_or_fn, "__name__", None)
        try:
            return self.exercise_set.question(name)
        except KeyError:
            return None

    def _unknown(self, name_or_fn):
        shown = name_or_fn if isinstance(name_or_fn, str) else getattr(name_or_fn, "__name__", repr(name_or_fn))
        names = ", ".join(q.name for q in self.questions)
        print(
            f"No question named {shown!r} in exercise set {self.exercise_set.id}. Questions: {names}. "
            "If your function has another name, pass the question's: ex.check(fn, \"causal_mask\")."
        )

    def _rng(self):
        return np.random.default_rng(self._seed)

    # -- checking ------------------------------------------------------------
    def result(self, fn, name=None):
        """Check ``fn`` and return the :class:`~keras_decoder.grading.spec.Verdict` (prints nothing).

        Args:
            fn: the learner's function.
            name: the question, when ``fn.__name__`` is not the question's name.
        """
        question = self._question(name or fn)
        if question is None:
            raise KeyError(f"No question for {name or getattr(fn, '__name__', fn)!r} in {self.exercise_set.id}.")
        cases = question.make_cases(self._rng())
        if not callable(fn):
            return evaluate(question, cases, None)
        return evaluate(question, cases, run_cases(fn, cases))

    def check(self, fn, name=None):
        """Check ``fn`` on fresh random inputs and print the verdict. Never raises.

        Args:
            fn: the learner's function, e.g. ``causal_mask``.
            name: the question, when ``fn.__name__`` is not the question's name.
        """
        if self._question(name or fn) is None:
            self._unknown(name or fn)
            return
        try:
            verdict = self.result(fn, name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a bug of ours must not stop the notebook
            print(f"Could not check `{name or getattr(fn, '__name__', fn)}`: {describe_exception(exc)}")
            return
        label = _LABELS[verdict.status]
        points = f" ({verdict.points}/{verdict.max_points} points)" if verdict.status != "not_attempted" else ""
        print(f"{label}{points}: {verdict.name}\n{verdict.feedback}")
        if verdict.status != "correct" and _nbgrader_running():
            raise AssertionError(f"{verdict.name}: {verdict.status}")

    def check_all(self, namespace=None):
        """Check every question's function found in ``namespace`` and print a summary.

        Args:
            namespace: where to look the functions up (default: the notebook's
                globals).
        """
        if namespace is None:
            namespace = vars(sys.modules["__main__"])
        total = 0
        print(f"Exercise set {self.exercise_set.id}: {self.exercise_set.title}")
        for question in self.questions:
            fn = namespace.get(question.name)
            try:
                verdict = self.result(fn, question.name) if callable(fn) else evaluate(question, [None], None)
                status = verdict.status
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                status = f"error ({describe_exception(exc)})"
                verdict = None
            points = verdict.points if verdict else 0
            total += points
            print(f"  {question.name:<32} {points:>2}/{question.points:<2} {status}")
        print(f"  {'total':<32} {total:>2}/{self.exercise_set.max_score}")

    # -- help ----------------------------------------------------------------
    def hint(self, name, level=1):
        """Print hint number ``level`` (1 = gentle) for a question (a name or the function)."""
        question = self._question(name)
        if question is None:
            self._unknown(name)
            return
        hints = question.hints
        level = max(1, min(int(level), len(hints)))
        more = (
            f" Next: ex.hint({question.name!r}, {level + 1})."
            if level < len(hints)
            else f" That was the last hint; ex.solution({question.name!r}) shows the reference."
        )
        print(f"Hint {level}/{len(hints)} for {question.name}: {hints[level - 1]}{more}")

    def solution(self, name):
        """Print the reference implementation (NumPy) that the grader compares with."""
        question = self._question(name)
        if question is None:
            self._unknown(name)
            return
        print(f"# Reference for {question.signature} (NumPy). {question.summary}")
        print(inspect.getsource(question.reference))

    def __repr__(self):
        n = len(self.questions)
        return (
            f"<Exercise {self.exercise_set.id!r}: {self.exercise_set.title}, {n} questions, "
            f"{self.exercise_set.max_score} points>"
        )


def load_exercise(exercise_id, seed=None):
    """The checker for exercise set ``exercise_id``, e.g. ``load_exercise("03_masks")``.

    Args:
        exercise_id: the set's id; see ``keras-decoder exercises list``.
        seed: seed the random inputs (default: fresh inputs every check).
    """
    if exercise_id not in exercise_sets():
        raise KeyError(f"Unknown exercise set {exercise_id!r}. Known: {sorted(exercise_sets())}")
    return Exercise(get_exercise_set(exercise_id), seed=seed)
