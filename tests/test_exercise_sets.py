"""The exercise sets of lessons 00, 01, 02, 04 and 05.

``tests/test_grading.py`` tests the grading machinery in depth on set 03.
These tests hold every other set to the same contract:

* the NumPy reference is judged correct on fresh random inputs;
* every catalogued mistake is recognised and named, on many draws;
* the ``keras.ops`` solutions of the source notebook are correct on the
  current backend, and the learner notebook's stubs are "not attempted";
* the committed learner notebook is what the generator makes;
* end to end, ``keras-decoder grade`` gives the source notebooks full marks
  and the learner notebooks 0 (one batch, in fresh kernels).
"""

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import keras
import nbformat
import numpy as np
import pytest

from keras_decoder.grading import evaluate, get_exercise_set, load_exercise
from keras_decoder.grading import cli, notebooks
from keras_decoder.grading.checker import run_cases

ROOT = Path(__file__).resolve().parents[1]
BACKEND = keras.backend.backend()
SET_IDS = [
    "00_backends_and_keras_masking",
    "01_decoder_inputs",
    "02_positions",
    "04_attention",
    "05_interacting_attention",
    "06_rnn_decoders",
    "07_transformer_decoder",
    "08_training_translation",
    "09_generation",
    "10_advanced_masks",
    "11_finetuning",
    "12_scaling_out",
]
SETS = {set_id: get_exercise_set(set_id) for set_id in SET_IDS}
QUESTIONS = [(s, q) for s in SET_IDS for q in SETS[s].questions]
MISTAKES = [(s, q, m) for s, q in QUESTIONS for m in q.mistakes]


def _namespace(path, role):
    """Run a notebook's setup and answer cells in this process; return its namespace."""
    nb = nbformat.read(path, as_version=4)
    namespace = {}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and (meta.get("solution") or cell.id == "setup"):
            with redirect_stdout(io.StringIO()):
                exec(cell.source, namespace)  # noqa: S102  (our own notebook)
    assert namespace["ex"].exercise_set.id == path.stem, f"{role} notebook {path} loads the wrong set"
    return namespace


def test_sets_are_registered_with_their_notebooks():
    for set_id, exercise_set in SETS.items():
        assert exercise_set.id == set_id
        assert len(exercise_set.questions) >= 3, f"{set_id}: at least 3 graded questions"
        assert (ROOT / exercise_set.source).is_file() and (ROOT / exercise_set.notebook).is_file()
    assert "sinusoidal_position_encoding" in [q.name for q in SETS["02_positions"].questions]


def test_sinusoidal_position_encoding_shape():
    question = SETS["02_positions"].question("sinusoidal_position_encoding")
    assert question.signature == "sinusoidal_position_encoding(length, dim)"
    assert question.reference(7, 6).shape == (7, 6)


@pytest.mark.parametrize("set_id,question", QUESTIONS, ids=[q.name for _, q in QUESTIONS])
def test_reference_is_correct_on_fresh_inputs(set_id, question):
    for seed in range(5):
        cases = question.make_cases(np.random.default_rng(seed))
        verdict = evaluate(question, cases, run_cases(question.reference, cases))
        assert verdict.status == "correct", verdict.feedback


@pytest.mark.parametrize("set_id,question,mistake", MISTAKES,
                         ids=[f"{q.name}-{m.name}" for _, q, m in MISTAKES])
def test_every_catalogued_mistake_is_diagnosed(set_id, question, mistake):
    assert mistake.variants, f"{question.name}/{mistake.name}: give an implementation to test"
    for implementation in mistake.variants:
        for seed in range(12):
            cases = question.make_cases(np.random.default_rng(2000 + seed))
            verdict = evaluate(question, cases, run_cases(implementation, cases))
            assert verdict.status in ("incorrect", "error"), verdict.feedback
            assert verdict.points == 0
            assert verdict.diagnosis == mistake.name, verdict.feedback


@pytest.mark.parametrize("set_id", SET_IDS)
def test_source_solutions_are_correct_on_this_backend(set_id):
    exercise_set = SETS[set_id]
    namespace = _namespace(ROOT / exercise_set.source, "source")
    ex = load_exercise(set_id, seed=11)
    for question in exercise_set.questions:
        verdict = ex.result(namespace[question.name])
        assert verdict.status == "correct", f"{question.name} on {BACKEND}: {verdict.feedback}"


@pytest.mark.parametrize("set_id", SET_IDS)
def test_learner_stubs_are_not_attempted(set_id):
    exercise_set = SETS[set_id]
    namespace = _namespace(ROOT / exercise_set.notebook, "learner")
    ex = load_exercise(set_id, seed=12)
    for question in exercise_set.questions:
        verdict = ex.result(namespace[question.name])
        assert (verdict.status, verdict.points) == ("not_attempted", 0), verdict.feedback


@pytest.mark.parametrize("set_id", SET_IDS)
def test_committed_learner_notebook_is_what_the_generator_makes(set_id):
    exercise_set = SETS[set_id]
    source = nbformat.read(ROOT / exercise_set.source, as_version=4)
    expected = notebooks.notebook_text(notebooks.make_learner_notebook(source))
    assert (ROOT / exercise_set.notebook).read_text(encoding="utf-8") == expected, "run `make exercises`"


def test_grader_gives_sources_full_marks_and_learners_zero(tmp_path):
    """One CLI run over the ten notebooks, each in a fresh sandboxed kernel."""
    folder = tmp_path / "submissions"
    folder.mkdir()
    for set_id in SET_IDS:
        exercise_set = SETS[set_id]
        (folder / f"{set_id}__source.ipynb").write_bytes((ROOT / exercise_set.source).read_bytes())
        (folder / f"{set_id}__learner.ipynb").write_bytes((ROOT / exercise_set.notebook).read_bytes())
    report = tmp_path / "grades.json"
    code = cli.main(["grade", str(folder), "--backend", BACKEND, "--jobs", "2", "--timeout", "120",
                     "--json", str(report), "--quiet"])
    assert code == 0
    results = {Path(r["notebook"]).stem: r for r in json.loads(report.read_text())}
    assert len(results) == 2 * len(SET_IDS)
    for set_id in SET_IDS:
        source, learner = results[f"{set_id}__source"], results[f"{set_id}__learner"]
        max_score = SETS[set_id].max_score
        assert (source["status"], source["score"], source["max_score"]) == ("graded", max_score, max_score), source
        assert (learner["status"], learner["score"]) == ("graded", 0), learner
        assert {q["status"] for q in learner["questions"]} == {"not_attempted"}, learner
