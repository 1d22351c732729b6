"""The exercise format: questions, test cases, diagnosed mistakes, verdicts.

An *exercise set* (:class:`ExerciseSet`) is a list of *questions*
(:class:`Question`). Each question asks for one function with a fixed name and
signature, and carries everything needed to judge an answer:

* ``reference``: a NumPy implementation, the ground truth;
* ``cases``: a function that draws fresh random inputs (:class:`Case`) from a
  ``numpy.random.Generator``, so no two runs call the learner's function on
  the same inputs;
* ``output``: what the result must look like (:class:`Output`: bool, int or
  float, and the tolerances for floats);
* ``mistakes``: a catalogue of common mistakes (:class:`Mistake`). A mistake is
  recognised when the learner's outputs agree with a *mistaken implementation*
  on every case (or, for mistakes that are not a single function, by a
  ``recognize`` predicate), and the feedback names it;
* ``hints``: graded hints, from a nudge to nearly the answer.

:func:`evaluate` turns the learner's per-case results (:class:`Outcome`) into
a :class:`Verdict`. It runs in two places only: in the learner's own notebook
(``ex.check``) and in the grader's process. It never runs inside the kernel
that executes a submission.

This module imports NumPy only, never Keras, so the grader starts fast.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

__all__ = [
    "Case",
    "Output",
    "Mistake",
    "Question",
    "ExerciseSet",
    "Outcome",
    "Verdict",
    "STATUSES",
    "evaluate",
    "compare",
    "format_array",
    "format_value",
]

#: The statuses a question can end in.
STATUSES = ("correct", "incorrect", "not_attempted", "error", "timeout")

#: Outcome kinds: what happened when the learner's function was called once.
OUTCOME_KINDS = ("ok", "not_implemented", "error", "bad_output", "timeout")


# ---------------------------------------------------------------------------
# Inputs and outputs.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One call of the learner's function: ``fn(*args, **kwargs)``.

    Arguments are NumPy arrays, Python scalars (``int``, ``float``, ``bool``)
    or ``None``: plain data that can be sent to a grading kernel.

    Attributes:
        args: positional arguments.
        kwargs: keyword arguments (an omitted keyword tests its default).
        label: a short human description of the inputs, shown in feedback,
            e.g. ``"query_len=2, key_len=5"``.
    """

    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    label: str = ""

    def copies(self):
        """Return ``(args, kwargs)`` with every array copied.

        A function that writes into its inputs cannot change the inputs that
        the reference or another case sees.
        """
        args = tuple(np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in self.args)
        kwargs = {
            k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v
            for k, v in self.kwargs.items()
        }
        return args, kwargs

    def call(self, fn):
        """Call ``fn`` on copies of this case's inputs."""
        args, kwargs = self.copies()
        return fn(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Output:
    """What a correct answer looks like.

    Attributes:
        kind: ``"bool"`` (a mask), ``"int"`` (token ids) or ``"float"``.
        rtol, atol: tolerances for ``"float"`` outputs. They are loose enough
            for float32 arithmetic in any order (and TF32 matmuls on a GPU),
            and far tighter than any catalogued mistake.
    """

    kind: str
    rtol: float = 2e-3
    atol: float = 2e-3

    def __post_init__(self):
        if self.kind not in ("bool", "int", "float"):
            raise ValueError(f"Expected kind in ('bool', 'int', 'float'). Received: kind={self.kind!r}")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What happened when the learner's function was called on one case.

    Attributes:
        kind: one of ``"ok"`` (returned an array: ``value``),
            ``"not_implemented"`` (raised ``NotImplementedError``), ``"error"``
            (raised something else: ``error``), ``"bad_output"`` (returned
            something that is not a numeric array: ``error``) or ``"timeout"``.
        value: the returned array, as NumPy, when ``kind == "ok"``.
        error: ``"ExceptionType: message"`` or a description of the output.
    """

    kind: str
    value: Any = None
    error: str = ""

    def __post_init__(self):
        if self.kind not in OUTCOME_KINDS:
            raise ValueError(f"Expected an outcome kind in {OUTCOME_KINDS}. Received: {self.kind!r}")


# ---------------------------------------------------------------------------
# Mistakes.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Mistake:
    """A common mistake, recognised and named.

    Give either ``impl`` or ``recognize``.

    Attributes:
        name: a short snake_case id, e.g. ``"top_left_alignment"``. It appears
            in feedback and in the grader's JSON (``diagnosis``).
        diagnosis: what went wrong and how to fix it, for the learner.
        impl: a mistaken implementation with the reference's signature, or a
            tuple of variants (the mistake is recognised if any variant
            matches). An implementation may raise on some cases, like the
            learner's would (a shape that does not broadcast): the mistake
            then matches only if the learner's function raised too.
        recognize: ``recognize(cases, outcomes, expected) -> bool`` for
            mistakes that are a family rather than one function (e.g. "an
            additive mask with any large negative number").
        applies: ``applies(case) -> bool``; the cases the mistake is defined
            on (default: all). Outside them the learner's output is ignored.
    """

    name: str
    diagnosis: str
    impl: Callable | tuple | None = None
    recognize: Callable | None = None
    applies: Callable | None = None

    def __post_init__(self):
        if (self.impl is None) == (self.recognize is None):
            raise ValueError(f"Mistake {self.name!r}: give exactly one of `impl` or `recognize`.")

    @property
    def variants(self):
        """The mistaken implementations, as a tuple."""
        if self.impl is None:
            return ()
        return self.impl if isinstance(self.impl, tuple) else (self.impl,)


# ---------------------------------------------------------------------------
# Questions and exercise sets.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Question:
    """One graded question: write the function ``name``.

    Attributes:
        name: the function's name; unique across all exercise sets.
        signature: e.g. ``"causal_mask(query_len, key_len)"``.
        points: points for a correct answer (all or nothing).
        summary: one line: what the function returns.
        reference: the NumPy reference implementation.
        cases: ``cases(rng) -> list[Case]``: fresh inputs for one check. Mix
            fixed *shapes* that separate every catalogued mistake from the
            reference with random *values*.
        output: the expected kind of output and tolerances.
        mistakes: the catalogue of diagnosed mistakes (at least three).
        hints: graded hints, the first gentle, the last nearly the answer.
    """

    name: str
    signature: str
    points: int
    summary: str
    reference: Callable
    cases: Callable
    output: Output
    mistakes: tuple = ()
    hints: tuple = ()

    def make_cases(self, rng):
        """Draw this question's cases with ``rng``."""
        cases = list(self.cases(rng))
        if not cases:
            raise ValueError(f"Question {self.name!r} drew no cases.")
        return cases


@dataclasses.dataclass(frozen=True)
class ExerciseSet:
    """An exercise set: one source notebook, its learner version, its questions.

    Attributes:
        id: e.g. ``"03_masks"``; the notebooks are ``exercises/<id>.ipynb`` and
            ``exercises/source/<id>.ipynb``.
        title: a human title.
        questions: the graded questions, in notebook order.
    """

    id: str
    title: str
    questions: tuple

    @property
    def notebook(self):
        """The learner notebook, relative to the repository root."""
        return f"exercises/{self.id}.ipynb"

    @property
    def source(self):
        """The source notebook (with solutions), relative to the repository root."""
        return f"exercises/source/{self.id}.ipynb"

    @property
    def max_score(self):
        """The total points of the set."""
        return sum(q.points for q in self.questions)

    def question(self, name):
        """The question whose function is ``name`` (``KeyError`` if none)."""
        for q in self.questions:
            if q.name == name:
                return q
        raise KeyError(
            f"No question named {name!r} in exercise set {self.id!r}. "
            f"Questions: {[q.name for q in self.questions]}"
        )


# ---------------------------------------------------------------------------
# Formatting for feedback.
# ---------------------------------------------------------------------------
def format_array(x, max_size=64):
    """A compact text rendering of a small array (booleans as 0/1)."""
    x = np.asarray(x)
    if x.size > max_size:
        return f"<array of shape {x.shape}, dtype {x.dtype}>"
    if x.dtype == bool:
        x = x.astype(np.int8)
    text = np.array2string(x, precision=3, suppress_small=True, separator=" ", max_line_width=100)
    return " ".join(text.split()) if x.ndim <= 1 else text


def format_value(x):
    """Render one argument for a case label, on one line."""
    if isinstance(x, np.ndarray):
        if x.size > 32:
            return f"<{x.dtype} array {x.shape}>"
        return " ".join(format_array(x).split())
    return repr(x)


def _indent(text, prefix="      "):
    return "\n".join(prefix + line for line in str(text).splitlines())


# ---------------------------------------------------------------------------
# Comparison.
# ---------------------------------------------------------------------------
_KIND_NAMES = {"bool": "a boolean array (dtype bool)", "int": "an integer array", "float": "a float array"}


def _dtype_ok(kind, dtype):
    if kind == "bool":
        return dtype == np.bool_
    if kind == "int":
        return dtype.kind in "iu"
    return dtype.kind == "f"


def compare(expected, got, output):
    """Why ``got`` is not ``expected``, or ``None`` when it is correct.

    Checks, in order: shape, dtype kind, NaN, and values (exact for bool and
    int outputs, ``allclose`` with the question's tolerances for floats).
    """
    got = np.asarray(got)
    if got.shape != expected.shape:
        return f"expected shape {expected.shape}, got shape {got.shape}"
    if not _dtype_ok(output.kind, got.dtype):
        return f"expected {_KIND_NAMES[output.kind]}, got dtype {got.dtype}"
    if output.kind == "float":
        if got.size and np.isnan(got).any() and not np.isnan(expected).any():
            where = np.argwhere(np.isnan(got))[0]
            return f"the output contains NaN (first at index {tuple(int(i) for i in where)})"
        close = np.isclose(got, expected, rtol=output.rtol, atol=output.atol, equal_nan=True)
    else:
        close = got == expected
    if close.all():
        return None
    wrong = np.argwhere(~close)
    first = tuple(int(i) for i in wrong[0])
    return (
        f"{len(wrong)} of {close.size} values differ; first at index {first}: "
        f"expected {np.asarray(expected[first]).item()!r}, got {np.asarray(got[first]).item()!r}"
    )


def _same(a, b, output):
    """Do two outputs agree (shape and values, dtype ignored)? Used for mistakes."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind not in "biuf" or b.dtype.kind not in "biuf":
        return False
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if output.kind == "float":
        return bool(np.allclose(a64, b64, rtol=output.rtol, atol=output.atol, equal_nan=True))
    return bool(np.array_equal(a64, b64, equal_nan=True))


_RAISED = object()  # marker: the mistaken implementation raised on this case


def _run_impl(impl, case):
    try:
        with np.errstate(all="ignore"):
            return np.asarray(case.call(impl))
    except Exception:
        return _RAISED


def _matches(mistake, question, cases, outcomes, expected):
    """Is the learner's behaviour the mistaken one on every applicable case?"""
    if mistake.recognize is not None:
        try:
            return bool(mistake.recognize(cases, outcomes, expected))
        except Exception:
            return False
    applicable = [i for i, c in enumerate(cases) if mistake.applies is None or mistake.applies(c)]
    if not applicable:
        return False
    for impl in mistake.variants:
        # Recognised only if the learner's outputs equal the mistaken ones on at least
        # one case (failing wherever the mistake fails is not enough on its own), and
        # the mistake differs from the reference somewhere.
        distinguishable, same_values, ok = False, False, True
        for i in applicable:
            wrong = _run_impl(impl, cases[i])
            outcome = outcomes[i]
            if wrong is _RAISED:
                distinguishable = True
                if outcome.kind not in ("error", "bad_output"):
                    ok = False
                    break
                continue
            if compare(expected[i], wrong, question.output) is not None:
                distinguishable = True
            if outcome.kind != "ok" or not _same(outcome.value, wrong, question.output):
                ok = False
                break
            same_values = True
        if ok and distinguishable and same_values:
            return True
    return False


# ---------------------------------------------------------------------------
# Verdicts.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Verdict:
    """The judgement of one question.

    Attributes:
        name: the question's function name.
        status: one of :data:`STATUSES`.
        points: points earned (``max_points`` when correct, else 0).
        max_points: the question's points.
        feedback: text for the learner.
        diagnosis: the name of the recognised mistake, or ``None``.
    """

    name: str
    status: str
    points: int
    max_points: int
    feedback: str
    diagnosis: str | None = None

    @property
    def correct(self):
        """Whether the answer is correct."""
        return self.status == "correct"

    def as_dict(self):
        """The question entry of the grader's JSON."""
        return {
            "name": self.name,
            "points": self.points,
            "max_points": self.max_points,
            "status": self.status,
            "feedback": self.feedback,
            "diagnosis": self.diagnosis,
        }


def _verdict(question, status, feedback, diagnosis=None):
    points = question.points if status == "correct" else 0
    return Verdict(question.name, status, points, question.points, feedback, diagnosis)


def not_defined(question, detail=""):
    """The verdict for a function that the notebook never defines."""
    text = f"`{question.name}` is not defined in the notebook: write `def {question.signature}:`."
    if detail:
        text += f" {detail}"
    return _verdict(question, "not_attempted", text)


def _shown(case, expected, got, output):
    lines = [f"  For {case.label}:" if case.label else "  For one of the inputs:"]
    difference = compare(expected, got, output)
    if difference:
        lines.append(f"    {difference}")
    if np.asarray(expected).size <= 64 and np.asarray(got).size <= 64:
        lines.append("    expected:")
        lines.append(_indent(format_array(expected)))
        lines.append("    got:")
        lines.append(_indent(format_array(got)))
    return "\n".join(lines)


def evaluate(question, cases, outcomes):
    """Judge the learner's results on ``cases``.

    Args:
        question: the :class:`Question`.
        cases: the :class:`Case` list that the function was called on.
        outcomes: one :class:`Outcome` per case, or ``None`` when the notebook
            does not define the function.

    Returns:
        A :class:`Verdict`. Its feedback names the recognised mistake if any,
        and shows the first input where the answer is wrong.
    """
    if outcomes is None:
        return not_defined(question)
    if len(outcomes) != len(cases):
        raise ValueError(f"Expected {len(cases)} outcomes. Received: {len(outcomes)}")
    kinds = [o.kind for o in outcomes]
    name = question.name
    if all(k == "not_implemented" for k in kinds):
        return _verdict(
            question,
            "not_attempted",
            f"`{name}` still raises NotImplementedError: replace `raise NotImplementedError()` "
            "with your code.",
        )
    if "timeout" in kinds:
        return _verdict(question, "timeout", f"`{name}` ran out of time and was stopped.")

    expected = [np.asarray(case.call(question.reference)) for case in cases]
    verdicts = [
        compare(e, o.value, question.output) if o.kind == "ok" else "not ok"
        for e, o in zip(expected, outcomes)
    ]
    if all(v is None for v in verdicts):
        return _verdict(question, "correct", f"`{name}` is correct on {len(cases)} fresh random inputs.")

    first = next(i for i, v in enumerate(verdicts) if v is not None)
    for mistake in question.mistakes:
        if _matches(mistake, question, cases, outcomes, expected):
            text = f"[{mistake.name}] {mistake.diagnosis}"
            bad = next((i for i, v in enumerate(verdicts) if v is not None and outcomes[i].kind == "ok"), None)
            if bad is not None:
                text += "\n" + _shown(cases[bad], expected[bad], outcomes[bad].value, question.output)
            return _verdict(question, "incorrect", text, mistake.name)

    problem = outcomes[first]
    where = f" for {cases[first].label}" if cases[first].label else ""
    if problem.kind == "not_implemented":
        return _verdict(
            question,
            "error",
            f"`{name}` raised NotImplementedError{where}: every input must be handled.",
        )
    if problem.kind == "error":
        return _verdict(question, "error", f"`{name}` raised {problem.error}{where}.")
    if problem.kind == "bad_output":
        return _verdict(question, "incorrect", f"`{name}` {problem.error}{where}.")
    text = f"`{name}` is incorrect.\n" + _shown(cases[first], expected[first], problem.value, question.output)
    return _verdict(question, "incorrect", text)


def validate_set(exercise_set, min_mistakes=3):
    """Check an exercise set's declaration; raise ``ValueError`` if it is malformed."""
    if not exercise_set.id or not exercise_set.questions:
        raise ValueError(f"Exercise set {exercise_set.id!r} needs an id and questions.")
    names = [q.name for q in exercise_set.questions]
    if len(set(names)) != len(names):
        raise ValueError(f"Exercise set {exercise_set.id!r} repeats a function name: {names}")
    for q in exercise_set.questions:
        if not isinstance(q.points, int) or q.points <= 0:
            raise ValueError(f"Question {q.name!r}: points must be a positive int. Received: {q.points!r}")
        if len(q.mistakes) < min_mistakes:
            raise ValueError(
                f"Question {q.name!r}: expected at least {min_mistakes} catalogued mistakes. "
                f"Received: {len(q.mistakes)}"
            )
        mistake_names = [m.name for m in q.mistakes]
        if len(set(mistake_names)) != len(mistake_names):
            raise ValueError(f"Question {q.name!r} repeats a mistake name: {mistake_names}")
        if not q.hints:
            raise ValueError(f"Question {q.name!r} has no hints.")
        if not q.signature.startswith(q.name + "("):
            raise ValueError(f"Question {q.name!r}: the signature must start with '{q.name}('.")
