"""Exercise sets, one module per set.

How to add a set (e.g. for lesson 04):

1. Write ``exercises/source/04_attention.ipynb``: a setup cell with
   ``ex = load_exercise("04_attention")``, then per question a task
   (markdown), a solution cell (the function, with the answer between
   ``### BEGIN SOLUTION`` and ``### END SOLUTION``) and a check cell
   (``ex.check(fn)``). Give the cells nbgrader metadata with
   :func:`keras_decoder.grading.notebooks.nbgrader_metadata`.
2. Add a module here, ``ex04_attention.py``, that defines
   ``EXERCISE_SET = ExerciseSet(id="04_attention", title=..., questions=(...))``.
   Each :class:`~keras_decoder.grading.spec.Question` has a NumPy reference, a
   case generator that draws fresh random inputs, and at least three
   :class:`~keras_decoder.grading.spec.Mistake` entries. Use NumPy only:
   the grader never imports Keras. Function names must be unique across
   all sets.
3. Run ``make exercises`` to generate ``exercises/04_attention.ipynb``, and
   add the set to the tests' parametrisation (``tests/test_grading.py``
   finds every registered set by itself).

Modules whose names start with ``ex`` are discovered automatically by
:mod:`keras_decoder.grading.registry`.
"""
