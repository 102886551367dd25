"""The student release (`python -m pefttutor.student`, `make student`) and its nbgrader grading.

The real notebooks are converted but never executed here (they load models for minutes); grading
end to end (nbgrader's generate_assignment, then autograde) runs on tests/fixtures/student_mini.ipynb,
two cheap exercises in the notebooks' style.
"""

from __future__ import annotations

import ast
import math
import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F

from pefttutor import calculator, combine, data, icl, metrics, student
from pefttutor.exercises import STUDENT_ENV, Exercise, conclusion, introduction, models_and_data, production, prompts
from tiny_models import ByteTokenizer, reversed_demos_exercise, tiny_llama, two_lora_adapters

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIXTURE = Path(__file__).parent / "fixtures" / "student_mini.ipynb"


def nbgrader_meta(cell) -> dict:
    return cell.metadata.get("nbgrader", {})


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """`python -m pefttutor.student --out <tmp>` on every notebook: the output folder."""
    out = tmp_path_factory.mktemp("release")
    assert student.main(["--out", str(out)]) == 0
    return out


# --- the student flag ----------------------------------------------------------------------------


def test_solution_refuses_under_the_student_flag(monkeypatch, capsys):
    ex = Exercise("add", lambda a: a == 4, hint="2 + 2", solution="answer = 2 + 2")
    monkeypatch.setenv(STUDENT_ENV, "1")
    ex.solution()
    out = capsys.readouterr().out
    assert "ask your instructor" in out and "2 + 2" not in out
    ex.hint()  # hints and checks work as usual
    assert ex.check(4) is True and "2 + 2" in capsys.readouterr().out
    for off in ("", "0", "false"):
        monkeypatch.setenv(STUDENT_ENV, off)
        ex.solution()
        assert "answer = 2 + 2" in capsys.readouterr().out
    monkeypatch.delenv(STUDENT_ENV)
    ex.solution()
    assert "answer = 2 + 2" in capsys.readouterr().out


def test_the_release_sets_the_flag_in_its_first_code_cell(release, monkeypatch, capsys):
    monkeypatch.delenv(STUDENT_ENV, raising=False)
    for path in NOTEBOOKS:
        nb = nbformat.read(release / "notebooks" / path.name, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert first.source == student.FLAG_SOURCE and nbgrader_meta(first)["locked"], path.name
        assert first.metadata.editable is False and first.metadata.deletable is False
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the cell writes os.environ: keep the real one
    exec(student.FLAG_SOURCE, {})
    ex = Exercise("add", lambda a: a == 4, hint="", solution="answer = 4")
    ex.solution()
    assert "ask your instructor" in capsys.readouterr().out


# --- the converter on every real notebook (not executed) ------------------------------------------


def _defined_names(cells) -> set[str]:
    """Every name the code cells bind at any level: imports, assignments, defs, loop targets."""
    names = set()
    for cell in cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(student._parse(cell.source)):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
    return names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_cell_gets_nbgrader_metadata(path, release):
    original = nbformat.read(path, as_version=4)
    instructor = nbformat.read(release / "nbgrader" / "source" / path.stem / path.name, as_version=4)
    released = nbformat.read(release / "notebooks" / path.name, as_version=4)
    from nbgrader.nbgraderformat import MetadataValidator  # nbgrader's own validator (duplicate ids too)

    for nb in (instructor, released):
        nbformat.validate(nb)
        MetadataValidator().validate_nb(nb)
    checks = [c.source for c in original.cells if c.cell_type == "code" and ".check(" in c.source]
    assert checks, f"{path.name} has no exercises"
    solutions = [(i, c) for i, c in enumerate(instructor.cells) if nbgrader_meta(c).get("solution")]
    assert len(solutions) == len(checks)  # every .check( cell, and only those
    ids = [nbgrader_meta(c)["grade_id"] for c in instructor.cells if c.metadata.get("nbgrader")]
    assert len(ids) == len(set(ids))
    for i, cell in solutions:
        meta, test = nbgrader_meta(cell), instructor.cells[i + 1]
        assert meta == {"grade": False, "grade_id": meta["grade_id"], "locked": False, "schema_version": 3,
                        "solution": True, "task": False}
        assert cell.source.count(student.BEGIN) == cell.source.count(student.END) >= 1
        assert nbgrader_meta(test) == {"grade": True, "grade_id": meta["grade_id"] + "-test", "locked": True,
                                       "points": 1, "schema_version": 3, "solution": False, "task": False}
        target = student._check_call(ast.parse(cell.source)).func.value
        assert f"assert {ast.unparse(target)}.check(answer) is True" in test.source
        # without its solution regions, the cell is the reader's cell again
        assert student._without(cell.source, student.BEGIN, student.END, None) in checks
    assert sum(nbgrader_meta(c).get("points", 0) for c in instructor.cells) == len(checks) > 0
    # every name a reference answer reads is defined by the notebook up to that cell
    for exercise in student.find_exercises(original):
        missing = student.free_names(exercise.reference) - _defined_names(original.cells[:exercise.index + 1])
        assert not missing, f"{path.name} {exercise.target}: the reference reads {missing}, not defined there"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_release_has_no_outputs_and_no_solutions(path, release):
    released = nbformat.read(release / "notebooks" / path.name, as_version=4)
    original = nbformat.read(path, as_version=4)
    assert "widgets" not in released.metadata
    for cell in released.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
        assert "execution" not in cell.metadata
        for mark in (student.BEGIN, student.END, student.BEGIN_HIDDEN, "assert "):
            assert mark not in cell.source or mark == "assert " and not nbgrader_meta(cell).get("grade")
    lines = {line.strip() for c in released.cells for line in c.source.split("\n")}
    for exercise in student.find_exercises(original):
        reference = {line.strip() for line in exercise.reference.split("\n")} - {""}
        if exercise.kind == "function":
            reference = {line.strip() for line in exercise.reference.split("\n")[1:]} - {""}
        assert not reference & lines, f"{path.name} {exercise.target}: reference lines in the release"
    # the reader's cells are all there, in order, each exercise with its stub
    kept = [c.source for c in released.cells if not nbgrader_meta(c).get("grade") and nbgrader_meta(c).get(
        "grade_id") != student.FLAG_ID]
    unstubbed = ["\n".join(line for line in s.split("\n") if line.strip() != student.STUB) for s in kept]
    assert unstubbed == [c.source for c in original.cells]


# --- the reference answers ---------------------------------------------------------------------------


def _every_exercise():
    return [(path, e) for path in NOTEBOOKS for e in student.find_exercises(nbformat.read(path, as_version=4))]


def test_the_table_holds_exactly_the_exercises_that_need_it():
    assert {e.key for _, e in _every_exercise() if e.kind == "table"} == set(student.REFERENCES)


class _Params:  # notebook 00's `params`, counting SmolLM2's parameters without loading it
    @staticmethod
    def count_parameters(model):
        return 0, 134_515_008


def _answer(code: str, namespace: dict):
    exec(code, namespace)
    return namespace["answer"]


def test_every_table_reference_is_accepted_by_its_checker():
    from pefttutor.models.bert import BertConfig, BertLayer

    rows = [{"method": "full", "gap": None, "file_bytes": 90e6}, {"method": "lora-qv", "gap": (-0.7, 0.6), "file_bytes": 3e5},
            {"method": "houlsby", "gap": (0.7, 0.5), "file_bytes": 1.2e6}, {"method": "head", "gap": (-8.8, 0.9), "file_bytes": 4.8e3}]
    adapters, weights = two_lora_adapters(), [1.0, 1.0]
    minilm_block = sum(p.numel() for p in BertLayer(BertConfig()).parameters())
    llm, tok, label_ids = tiny_llama(), ByteTokenizer(), [3, 4, 5]
    reversed_ex, tweets, demos = reversed_demos_exercise(llm, tok, label_ids)
    cases = {  # exercise as the notebook makes it, and the names its reference reads there
        ("models_and_data", "embedding_share"): (models_and_data.embedding_share(134_515_008),
                                                 {"params": _Params, "llm": None}),
        ("introduction", "what_fits_24gb"): (introduction.what_fits_24gb(), {}),
        ("introduction", "minilm_block_params"): (introduction.minilm_block_params(minilm_block), {}),
        ("prompts", "argmax_gradient"): (prompts.argmax_gradient(), {}),
        ("prompts", "reversed_demonstrations"): (reversed_ex, {"data": data, "icl": icl, "metrics": metrics, "llm": llm,
                                                            "tok": tok, "label_ids": label_ids, "demos": demos,
                                                            "test_set": tweets, "y_test": [t["label"] for t in tweets]}),
        ("conclusion", "smallest_close_to_full"): (conclusion.smallest_close_to_full(rows),
                                                   {"minilm_rows": rows}),
        ("conclusion", "lora_65b_rank"): (conclusion.lora_65b_rank, {"calc": calculator}),
        ("production", "smallest_svd_rank"): (production.smallest_svd_rank(adapters, weights, tolerance=0.01),
                                              {"combine": combine, "math": math, "adapters": adapters,
                                               "weights": weights}),
    }
    cases.update(_experiment_cases())
    assert set(cases) == set(student.REFERENCES)
    for key, code in student.REFERENCES.items():
        exercise, namespace = cases[key]
        assert student.accepts(exercise, _answer(code, dict(namespace))), key


def _experiment_cases() -> dict:
    """The experiment exercises of notebooks 03-05 on tiny stand-ins (tests/test_exercises.py builds
    them), with the names their references read in the notebooks."""
    import copy
    import statistics

    from test_exercises import (tiny_classifier_and_batches, tiny_llama_and_val_loss, tiny_prefixed_llama_and_ids,
                                trained_lora_pair)

    from pefttutor import config, train, widgets
    from pefttutor import quantized
    from pefttutor.exercises import adapters as nb04, beyond_lora as nb07, llama_adapter as nb04_llama, lora as nb05
    from pefttutor.exercises import prefix as nb03
    from pefttutor.methods import adapters, llama_adapter

    model, ids = tiny_prefixed_llama_and_ids()

    class Tokenizer:  # what the viewer needs: the same ids as a tensor, and names for the tokens
        def __call__(self, text, return_tensors=None):
            return {"input_ids": ids}

        def decode(self, token_ids):
            return str(token_ids[0])

    viewer = widgets.prefix_attention_viewer(model, Tokenizer(), {"the example": "..."})
    classifier, batches = tiny_classifier_and_batches()

    @torch.no_grad()
    def val_loss(m):  # notebook 04's
        m.eval()
        return statistics.fmean(train.classification_loss(m, b).item() for b in batches)

    torch.manual_seed(0)
    adapted = llama_adapter.apply(tiny_llama(num_hidden_layers=12), n_tokens=3)
    with torch.no_grad():
        for a in llama_adapter.adapters(adapted).values():
            a.adaption_gate.normal_(std=0.5)  # open, as after training
    heldout = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    dW, q = trained_lora_pair()
    llm, val_loss_07 = tiny_llama_and_val_loss()
    return {
        ("prefix", "prefix_attention_layer"): (nb03.prefix_attention_layer(model, ids),
                                               {"attention_viewer": viewer, "first_example": "the example"}),
        ("adapters", "step0_loss"): (nb04.step0_loss(classifier, batches, size=8, sigma=0.1, compare_size=16),
                                     {"config": config, "val_loss": val_loss, "adapters": adapters, "copy": copy,
                                      "head_model": classifier}),
        ("llama_adapter", "closed_gates_loss"): (nb04_llama.closed_gates_loss(adapted, heldout, layers=range(2, 12)),
                                                 {"copy": copy, "llama_adapter": llama_adapter,
                                                  "train": train, "adapted_llm": adapted, "heldout": heldout,
                                                  "n_layers": 12}),
        ("lora", "update_overlap"): (nb05.update_overlap(dW, q), {"torch": torch, "q": q, "dW": dW}),
        ("beyond_lora", "mlp_only_loss"): (nb07.mlp_only_loss(llm, val_loss_07),
                                           {"copy": copy, "quantized": quantized, "llm": llm, "val_loss": val_loss_07}),
    }


def test_every_derived_reference_is_accepted_by_its_checker():
    derived = [(path, e) for path, e in _every_exercise() if e.kind != "table"]
    assert {e.kind for _, e in derived} == {"expression", "function", "assignment"}
    for path, e in derived:
        assert e.exercise is not None
        namespace = {"calc": calculator, "torch": torch, "F": F}
        if e.kind == "function":
            exec(e.reference, namespace)
            answer = namespace[ast.parse(e.reference).body[0].name]
        else:
            answer = _answer(e.reference, namespace)
        assert student.accepts(e.exercise, answer), (path.name, e.target, e.reference)


def test_a_solution_that_is_not_code_needs_a_table_entry(monkeypatch):
    monkeypatch.delitem(student.REFERENCES, ("prompts", "argmax_gradient"))
    with pytest.raises(ValueError, match="prompts.argmax_gradient.*REFERENCES"):
        student.find_exercises(nbformat.read(ROOT / "notebooks" / "02_hard_vs_soft_prompts.ipynb", as_version=4))


def test_a_derived_reference_its_checker_refuses_is_an_error(monkeypatch):
    """A solution() that writes a count as 16,777,216 is, as code, a tuple: its checker refuses it."""
    real = production.llama7b_ring()
    monkeypatch.setattr(production, "llama7b_ring", lambda: Exercise(real.title, real.checker, hint="",
                                                                     solution="2 * 7 * 16,777,216 // 8"))
    with pytest.raises(ValueError, match="not accepted by its own checker"):
        student.find_exercises(nbformat.read(ROOT / "notebooks" / "08_production.ipynb", as_version=4))


# --- nbgrader end to end, on the fixture --------------------------------------------------------------


def _outputs(nb) -> list[tuple[dict, list]]:
    return [(nbgrader_meta(c), c.outputs) for c in nb.cells if c.cell_type == "code"]


# nbgrader 0.9.6's gradebook warns under SQLAlchemy 2.1 (objects not in session); the grades are right
@pytest.mark.filterwarnings("ignore:Object of type:sqlalchemy.exc.SAWarning")
def test_nbgrader_generates_the_release_and_grades_it(tmp_path, monkeypatch):
    """generate_assignment gives our student notebook; autograde gives a submission of the reference
    answers full points and an untouched one zero, without other errors."""
    from nbgrader.api import Gradebook  # nbgrader is in the test extra: required, never skipped
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config.loader import PyFileConfigLoader

    assignment = FIXTURE.stem
    assert student.build([FIXTURE], tmp_path) == {FIXTURE.name: 2}
    course = tmp_path / "nbgrader"
    monkeypatch.chdir(course)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # alembic
    monkeypatch.setenv("PEFTTUTOR_FIGURES", str(tmp_path / "figures"))  # the config's setdefault leaves it
    config = PyFileConfigLoader("nbgrader_config.py", path=str(course)).load_config()
    config.CourseDirectory.root = str(course)
    config.Execute.timeout = 120
    api = NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)

    result = api.generate_assignment(assignment)
    assert result["success"], result.get("error") or result.get("log")
    generated = nbformat.read(course / "release" / assignment / FIXTURE.name, as_version=4)
    ours = nbformat.read(tmp_path / "notebooks" / FIXTURE.name, as_version=4)
    assert [c.source for c in generated.cells] == [c.source for c in ours.cells]
    for a, b in zip(generated.cells, ours.cells):
        meta = {k: v for k, v in nbgrader_meta(a).items() if k not in ("checksum", "cell_type")}
        assert meta == nbgrader_meta(b)
        assert {k: v for k, v in a.metadata.items() if k != "nbgrader"} == \
               {k: v for k, v in b.metadata.items() if k != "nbgrader"}

    # alice hands in the release with the reference answers, bob the release untouched
    instructor = nbformat.read(course / "source" / assignment / FIXTURE.name, as_version=4)
    answers = {nbgrader_meta(c)["grade_id"]: c.source for c in instructor.cells if nbgrader_meta(c).get("solution")}
    solved = nbformat.read(tmp_path / "notebooks" / FIXTURE.name, as_version=4)
    for cell in solved.cells:
        if nbgrader_meta(cell).get("solution"):
            cell.source = answers[nbgrader_meta(cell)["grade_id"]]
    for name, nb in {"alice": solved, "bob": ours}.items():
        (course / "submitted" / name / assignment).mkdir(parents=True)
        nbformat.write(nb, course / "submitted" / name / assignment / FIXTURE.name)
        result = api.autograde(assignment, name)
        assert result["success"], result.get("error") or result.get("log")

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        scores = {name: gradebook.find_submission(assignment, name) for name in ("alice", "bob")}
        assert {n: (s.score, s.max_score) for n, s in scores.items()} == {"alice": (2.0, 2.0), "bob": (0.0, 2.0)}

    graded = {name: nbformat.read(course / "autograded" / name / assignment / FIXTURE.name, as_version=4)
              for name in ("alice", "bob")}
    for meta, outputs in _outputs(graded["alice"]):
        assert all(o.output_type != "error" for o in outputs), (meta, outputs)
    for meta, outputs in _outputs(graded["bob"]):  # only the hidden tests fail, restored and run
        errors = [o for o in outputs if o.output_type == "error"]
        assert [o.ename for o in errors] == (["AssertionError"] if meta.get("grade") else []), (meta, outputs)
    printed = "".join(o.get("text", "") for _, outputs in _outputs(graded["bob"]) for o in outputs)
    assert printed.count("not attempted yet") >= 2  # the untouched checks ran and said so
    shutil.rmtree(course / "autograded")
