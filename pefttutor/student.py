"""The student release of the notebooks, and an nbgrader course for grading it (`make student`).

    python -m pefttutor.student --out release

writes

* `release/notebooks/*.ipynb`: every notebook for students: no outputs, execution counts reset, no
  reference answers; every exercise still calls `exN.check(answer)`, so it grades as before, and a
  locked first code cell sets `PEFTTUTOR_STUDENT=1`, so `exN.solution()` says to ask the instructor.
* `release/nbgrader/`: an nbgrader (0.9, metadata schema 3) course folder with the instructor
  version of each notebook, `source/<notebook>/<notebook>.ipynb` (one assignment per notebook), and
  `nbgrader_config.py`. There `nbgrader generate_assignment <notebook>` produces the same student
  notebook as `release/notebooks/` (tested) and `nbgrader autograde <notebook>` grades submissions.

Every exercise cell (a code cell calling `<exercise>.check(answer)`) becomes an nbgrader *solution*
cell: the reference answer goes between `### BEGIN SOLUTION` / `### END SOLUTION` lines, after the
reader's placeholder (`answer = ...`, or the `...  # your code` body of the function to write), and
the student version replaces it with `# YOUR CODE HERE` (`STUB`, nbgrader_config.py's
`ClearSolutions.code_stub`). The placeholder stays, so an untouched student notebook still runs top to
bottom, as the tutorial's do. Right after it comes a locked, autograded *test* cell worth 1 point
whose `assert <exercise>.check(answer) is True` is a hidden test: nbgrader removes it from the student
version and restores it when grading (`autograde` puts back every locked cell's source).

The reference answer comes from the exercise's own `solution()` text where that is a plain Python
expression (`96 * 2 * 8 * (12288 + 12288)`), a function definition (its body goes into the reader's
`def`) or an `answer = ...` line. The exercise is made from the factory the cell calls, with the
cell's literal arguments; an argument that is a notebook value (`llm.config`) takes the factory's
default, which is the notebook's model (`LlamaConfig()` is SmolLM2's). Where neither works (the text
is prose, a required argument is a notebook value, or the answer comes from the notebook's own runs)
`REFERENCES` holds the reference code, keyed by exercise; tests/test_student.py checks every entry
against its checker and that the table holds exactly the exercises that need it.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import nbformat

from pefttutor.config import repo_root
from pefttutor.exercises import STUDENT_ENV, Exercise

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
STUB = "# YOUR CODE HERE"  # what replaces a solution region in the student version
POINTS = 1  # per exercise
FLAG_ID = "pefttutor-student-flag"
FLAG_SOURCE = (
    "# Student release: exN.solution() points you to your instructor; exN.hint() and exN.check(answer) work as usual.\n"
    "import os\n"
    "\n"
    f'os.environ["{STUDENT_ENV}"] = "1"'
)
SCHEMA_VERSION = 3  # nbgrader 0.9's cell metadata

# Reference answers that the exercise's solution() text cannot give (see the module docstring), keyed
# by (module of pefttutor.exercises, factory or attribute). Code run in the notebook, after the
# reader's placeholder; it must set `answer` and may use only what the notebook defines before.
REFERENCES: dict[tuple[str, str], str] = {
    ("models_and_data", "embedding_share"):  # required argument: the notebook's parameter count
        "answer = 49152 * 576 / params.count_parameters(llm)[1]  # about 0.21: a fifth of a small LM is its vocabulary",
    ("introduction", "what_fits_24gb"):  # solution() is prose
        'answer = "lora"  # full: 8 bytes x 6.74e9 = 54 GB; LoRA: about 2 x 6.74e9 = 13.5 GB + 8 x 4.2M = 0.03 GB',
    ("introduction", "minilm_block_params"):  # required argument: the notebook's count
        "answer = 4 * (384 * 384 + 384) + (384 * 1536 + 1536) + (1536 * 384 + 384) + 2 * 2 * 384  # = 1,774,464",
    ("prompts", "argmax_gradient"):  # solution() is prose
        'answer = "c"  # argmax returns an integer index with no grad_fn: z never enters the graph',
    ("prompts", "reversed_demonstrations"):  # the answer is this notebook's experiment
        "prompts = [data.tweet_prompt(ex['text'], demos[:4][::-1]) for ex in test_set]\n"
        "answer = metrics.accuracy(icl.label_scores(llm, tok, prompts, label_ids).argmax(-1).tolist(), y_test)",
    ("prefix", "prefix_attention_layer"):  # the answer is this notebook's experiment, read off its viewer
        "attention_viewer.set(example=first_example)\n"
        "answer = int(attention_viewer.state['prefix'].mean(-1).argmax())  # layers x heads -> the layer",
    ("adapters", "step0_loss"):  # the answer is this notebook's experiment
        "config.seed_everything(0)  # right before adapters.apply, as section 3 does\n"
        "answer = val_loss(adapters.apply(copy.deepcopy(head_model), size=8, sigma=0.1))",
    ("llama_adapter", "closed_gates_loss"):  # the answer is this notebook's experiment
        "closed = copy.deepcopy(adapted_llm)  # a copy: the trained adapter keeps its gates\n"
        "for top in list(llama_adapter.adapters(closed).values())[n_layers - 10:]:  # bottom first\n"
        "    top.adaption_gate.data.zero_()  # closed\n"
        "answer = train.causal_lm_loss(closed, heldout).item()  # held out, the top 10 gates closed",
    ("lora", "update_overlap"):  # the answer is this notebook's experiment
        "dW_lora = (q.scaling * q.lora_B.weight @ q.lora_A.weight).detach().double()\n"
        "U = torch.linalg.svd(dW_lora, full_matrices=False)[0][:, :q.r]\n"
        "answer = ((U.T @ dW.double()).norm() ** 2 / dW.double().norm() ** 2).item()",
    ("conclusion", "smallest_close_to_full"):  # the answer comes from this notebook's study table
        'close = {r["method"]: r["file_bytes"] for r in minilm_rows\n'
        '         if r["method"] == "full" or r["gap"][0] >= -2 * r["gap"][1]}\n'
        "answer = min(close, key=close.get)  # the smallest file among the methods within noise of full finetuning",
    ("conclusion", "lora_65b_rank"):  # solution() is prose; the answer is the search it describes
        "answer = max(r for r in range(1, 4097)\n"
        '             if calc.gb(calc.training_memory_bytes("llama-65b", "lora", r=r, dtype="bf16")) <= 140)\n'
        "# the frozen bf16 weights take most of it: 2 bytes x 65.3e9",
    ("production", "smallest_svd_rank"):  # the answer comes from this notebook's adapters
        'cat = combine.delta_weights(*combine.weighted_adapter(adapters, weights, "cat"))  # the exact sum\n'
        "\n"
        "\n"
        "def svd_error(k):\n"
        '    svd = combine.delta_weights(*combine.weighted_adapter(adapters, weights, "svd", svd_rank=k))\n'
        "    return math.sqrt(sum(float((svd[p] - cat[p]).square().sum()) for p in cat)\n"
        "                     / sum(float(c.square().sum()) for c in cat.values()))\n"
        "\n"
        "\n"
        "answer = next(k for k in range(1, 1 + sum(cfg.r for cfg, _ in adapters)) if svd_error(k) <= 0.01)",
    ("beyond_lora", "mlp_only_loss"):  # the answer is this notebook's experiment
        'answer = val_loss(quantized.quantize_model(copy.deepcopy(llm), ["gate_proj", "up_proj", "down_proj"]))',
}


@dataclass
class ExerciseCell:
    """One exercise cell of a notebook, and what the converter makes of it."""

    index: int  # in the original notebook's cells
    target: str  # what `.check` is called on: "ex1", "ex.llama_adapter_7b"
    module: str  # pefttutor.exercises.<module>
    name: str  # the factory or attribute of that module
    grade_id: str  # of the solution cell; the test cell's is grade_id + "-test"
    reference: str  # the solution region's code (without the BEGIN/END lines)
    kind: str  # "expression", "function", "assignment" (derived from solution()) or "table" (REFERENCES)
    exercise: Exercise | None  # made as the cell makes it (notebook values: defaults); None if it cannot be

    @property
    def key(self) -> tuple[str, str]:
        return self.module, self.name


def _exercise_modules(cells: list) -> dict[str, str]:
    """{alias: module name} for every `from pefttutor.exercises import <module> [as alias]` in these cells."""
    aliases = {}
    for cell in cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(_parse(cell.source)):
            if isinstance(node, ast.ImportFrom) and node.module == "pefttutor.exercises":
                for alias in node.names:
                    aliases[alias.asname or alias.name] = alias.name
    return aliases


def _parse(source: str) -> ast.Module:
    # IPython magics (%time, !pip) are no Python: blank them out, keeping the line numbers
    return ast.parse("\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.split("\n")))


def _check_call(tree: ast.Module) -> ast.Call | None:
    """The cell's top-level `<exercise>.check(answer)` call, if any."""
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(call := stmt.value, ast.Call) and \
                isinstance(call.func, ast.Attribute) and call.func.attr == "check":
            return call
    return None


def is_exercise_cell(cell) -> bool:
    return cell.cell_type == "code" and ".check(" in cell.source and _check_call(_parse(cell.source)) is not None


def _factory(tree: ast.Module, target: ast.expr, aliases: dict[str, str]) -> tuple[str, str, ast.Call | None]:
    """(module, factory or attribute name, the call or None) that made the exercise `target` names."""
    value = target
    if isinstance(target, ast.Name):  # ex1 = exercises.gpt3_params(...) in the same cell
        assigned = [s.value for s in tree.body if isinstance(s, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == target.id for t in s.targets)]
        if not assigned:
            raise ValueError(f"{target.id!r} is not assigned in its exercise cell")
        value = assigned[-1]
    call = value if isinstance(value, ast.Call) else None
    func = call.func if call is not None else value
    if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in aliases):
        raise ValueError(f"cannot tell which exercise {ast.unparse(value)!r} is")
    return aliases[func.value.id], func.attr, call


def _make_exercise(module: str, name: str, call: ast.Call | None) -> Exercise | None:
    """The exercise with the cell's literal arguments and defaults for the others; None if one is required."""
    obj = getattr(importlib.import_module(f"pefttutor.exercises.{module}"), name)
    if isinstance(obj, Exercise):
        return obj
    params = list(inspect.signature(obj).parameters.values())
    args, kwargs = [], {}
    for i, node in enumerate(call.args if call is not None else []):
        try:
            args.append(ast.literal_eval(node))
        except (ValueError, TypeError, SyntaxError):  # not a literal: a notebook value
            if params[i].default is inspect.Parameter.empty:
                return None
            args.append(params[i].default)
    for kw in call.keywords if call is not None else []:
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError):  # not a literal: a notebook value
            if inspect.signature(obj).parameters[kw.arg].default is inspect.Parameter.empty:
                return None
    return obj(*args, **kwargs)


def _derive(solution: str) -> tuple[str, str] | None:
    """(kind, code) of a solution() text that is code: an expression, one function definition, or
    `answer = ...`; None when it is prose."""
    text = solution.strip()
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    if len(tree.body) != 1:
        return None
    stmt = tree.body[0]
    if isinstance(stmt, ast.Expr) and "\n" not in text:
        return "expression", f"answer = {text}"
    if isinstance(stmt, ast.FunctionDef):
        return "function", text
    if isinstance(stmt, ast.Assign) and [ast.unparse(t) for t in stmt.targets] == ["answer"]:
        return "assignment", text
    return None


def accepts(exercise: Exercise, answer) -> bool:
    """Whether `exercise`'s checker takes `answer`, silently (check() prints)."""
    try:
        verdict = exercise.checker(answer)
    except AssertionError:
        return False
    return bool(verdict[0] if isinstance(verdict, tuple) else verdict)


def free_names(code: str) -> set[str]:
    """Names `code` reads that it does not bind itself (nor are builtins)."""
    import builtins

    tree = ast.parse(code)
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.Lambda)):
            bound |= {a.arg for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]}
            bound |= {a.arg for a in (node.args.vararg, node.args.kwarg) if a is not None}
            if isinstance(node, ast.FunctionDef):
                bound.add(node.name)
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return loaded - bound - set(dir(builtins))


def _grade_id(target: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", target.rsplit(".", 1)[-1])


def find_exercises(nb) -> list[ExerciseCell]:
    """Every exercise cell of a notebook, with its reference answer."""
    found = []
    for index, cell in enumerate(nb.cells):
        if not is_exercise_cell(cell):
            continue
        tree = _parse(cell.source)
        target = _check_call(tree).func.value
        module, name, call = _factory(tree, target, _exercise_modules(nb.cells[:index + 1]))
        derived, exercise = None, _make_exercise(module, name, call)
        if (module, name) not in REFERENCES:
            derived = _derive(exercise._solution) if exercise is not None else None
            if derived is None:
                raise ValueError(f"no reference answer for exercise {module}.{name} (cell {index}): "
                                 "its solution() is not code; add it to pefttutor.student.REFERENCES")
            if derived[0] == "expression" and not free_names(derived[1]):  # plain arithmetic: verify it
                namespace: dict = {}
                exec(derived[1], {"__builtins__": {}}, namespace)
                if not accepts(exercise, namespace["answer"]):
                    raise ValueError(f"the solution() of exercise {module}.{name} (cell {index}), "
                                     f"{derived[1]!r}, is not accepted by its own checker: "
                                     "add a reference to pefttutor.student.REFERENCES")
        kind, reference = derived or ("table", REFERENCES[module, name])
        found.append(ExerciseCell(index, ast.unparse(target), module, name, _grade_id(ast.unparse(target)),
                                  reference, kind, exercise))
    ids = [e.grade_id for e in found]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two exercises would share a grade id: {ids}")
    return found


def _region(lines: list[str], indent: str = "") -> list[str]:
    return [indent + BEGIN, *(indent + line if line else line for line in lines), indent + END]


def solution_source(source: str, exercise: ExerciseCell) -> str:
    """The exercise cell with the reference answer in solution regions, after the reader's placeholders."""
    lines, tree = source.split("\n"), _parse(source)
    inserts: dict[int, list[str]] = {}  # after line number (1-based) -> lines
    answer = exercise.reference
    if exercise.kind == "function":
        solution = ast.parse(exercise.reference).body[0]
        defs = [s for s in tree.body if isinstance(s, ast.FunctionDef) and s.name == solution.name]
        if not defs:
            raise ValueError(f"the cell of {exercise.target} has no `def {solution.name}` to complete")
        body_lines = exercise.reference.split("\n")[solution.body[0].lineno - 1:]
        end = defs[0].body[-1].end_lineno
        indent = re.match(r"\s*", lines[defs[0].body[0].lineno - 1]).group(0)
        inserts[end] = _region(textwrap.dedent("\n".join(body_lines)).split("\n"), indent)
        answer = f"answer = {solution.name}"
    placeholders = [s for s in tree.body if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)
                    and [ast.unparse(t) for t in s.targets] == ["answer"] and s.value.value in (None, Ellipsis)]
    if len(placeholders) != 1:
        raise ValueError(f"the cell of {exercise.target} needs one `answer = ...` (or None) placeholder line")
    inserts.setdefault(placeholders[0].end_lineno, []).extend(_region(answer.split("\n")))
    out = []
    for number, line in enumerate(lines, 1):
        out.append(line)
        out.extend(inserts.get(number, []))
    return "\n".join(out)


def grade_source(exercise: ExerciseCell) -> str:
    return (f"# Autograded ({POINTS} point): {exercise.target}.check(answer) above must print ✅.\n"
            "# The test is hidden; it runs when the notebook is graded.\n"
            f"{BEGIN_HIDDEN}\n"
            f'assert {exercise.target}.check(answer) is True, "{exercise.target}: not solved"\n'
            f"{END_HIDDEN}")


def _nbgrader(grade_id: str, *, solution=False, grade=False, locked=False, points=None) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": SCHEMA_VERSION,
            "solution": solution, "task": False}
    if points is not None:
        meta["points"] = points
    return meta


def _clean(cell) -> None:
    """Outputs, execution counts and run metadata (timestamps, collapsed or scrolled outputs) gone."""
    if cell.cell_type == "code":
        cell.outputs, cell.execution_count = [], None
    for key in ("execution", "collapsed", "scrolled", "ExecuteTime"):
        cell.metadata.pop(key, None)


def instructor_notebook(nb) -> nbformat.NotebookNode:
    """The nbgrader source version: no outputs, reference answers in solution regions, hidden tests."""
    exercises = {e.index: e for e in find_exercises(nb)}
    out = copy.deepcopy(nb)
    out.metadata.pop("widgets", None)  # saved widget state is output
    cells = []
    for index, cell in enumerate(out.cells):
        _clean(cell)
        if index == next(i for i, c in enumerate(out.cells) if c.cell_type == "code"):
            flag = nbformat.v4.new_code_cell(FLAG_SOURCE, id=FLAG_ID)
            flag.metadata.nbgrader = _nbgrader(FLAG_ID, locked=True)
            cells.append(flag)
        cells.append(cell)
        if (exercise := exercises.get(index)) is not None:
            cell.source = solution_source(cell.source, exercise)
            cell.metadata.nbgrader = _nbgrader(exercise.grade_id, solution=True)
            test = nbformat.v4.new_code_cell(grade_source(exercise), id=f"{exercise.grade_id}-test")
            test.metadata.nbgrader = _nbgrader(f"{exercise.grade_id}-test", grade=True, locked=True, points=POINTS)
            cells.append(test)
    out.cells = cells
    return out


def _without(source: str, begin: str, end: str, stub: str | None) -> str:
    """`source` with each begin..end region replaced by `stub` (indented like `begin`), or dropped."""
    out, inside = [], False
    for line in source.split("\n"):
        if begin in line:
            inside = True
            if stub is not None:
                indent = re.match(r"\s*", line).group(0)
                out.extend(indent + s for s in stub.split("\n"))
        elif end in line:
            inside = False
        elif not inside:
            out.append(line)
    return "\n".join(out)


def student_notebook(instructor) -> nbformat.NotebookNode:
    """What `nbgrader generate_assignment` makes of the instructor version (our STUB; no checksums):
    solution regions replaced, hidden tests removed, locked and grade cells read-only."""
    out = copy.deepcopy(instructor)
    for cell in out.cells:
        meta = cell.metadata.get("nbgrader")
        cell.source = _without(_without(cell.source, BEGIN, END, STUB), BEGIN_HIDDEN, END_HIDDEN, None)
        if meta is None:
            continue
        if meta["solution"]:
            cell.metadata.deletable = False
        elif meta["grade"] or meta["locked"]:
            cell.metadata.deletable = cell.metadata.editable = False
    return out


NBGRADER_CONFIG = f'''\
# nbgrader configuration of the pefttutor course (written by `python -m pefttutor.student`).
# Run nbgrader from this folder: `nbgrader generate_assignment 05_lora`, `nbgrader autograde 05_lora`.
import os
from pathlib import Path

c = get_config()  # noqa: F821

# A solution region becomes a comment: the reader's `answer = ...` placeholder stays above it, so the
# student notebook runs top to bottom untouched (nbgrader's default stub raises NotImplementedError).
c.ClearSolutions.code_stub = {{"python": {STUB!r}}}
# Full-mode cells train models for minutes (nbgrader's default: 30 s per cell).
c.Execute.timeout = 3600
# Grading runs every notebook: keep its figures out of the checkout's figures/.
os.environ.setdefault("PEFTTUTOR_FIGURES", str(Path(__file__).resolve().parent / "figures"))
# The experiment exercises (06 ex2, 08 ex3) are answered from the reader's own run: grade in the mode
# the students ran, full by default; `PEFTTUTOR_FAST=1 nbgrader autograde ...` if they ran fast mode.
'''


def _write(nb, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.validate(nb)
    try:  # nbgrader's own metadata validator, where nbgrader is installed
        from nbgrader.nbgraderformat import MetadataValidator
    except ImportError:
        pass
    else:
        MetadataValidator().validate_nb(nb)
    path.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")


def build(notebooks: list[Path], out: Path) -> dict[str, int]:
    """Write `out`/notebooks (student) and `out`/nbgrader (instructor course); {notebook: points}."""
    points = {}
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        instructor = instructor_notebook(nb)
        _write(instructor, out / "nbgrader" / "source" / path.stem / path.name)
        _write(student_notebook(instructor), out / "notebooks" / path.name)
        points[path.name] = sum(c.metadata.get("nbgrader", {}).get("points", 0) for c in instructor.cells)
    (out / "nbgrader" / "nbgrader_config.py").write_text(NBGRADER_CONFIG, encoding="utf-8")
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pefttutor.student", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("release"), help="output folder (default: release)")
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to convert (default: every notebooks/NN_*.ipynb)")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    points = build(notebooks, args.out)
    for name, n in points.items():
        print(f"{name}: {n} point{'s' * (n != 1)}")
    print(f"student notebooks in {args.out / 'notebooks'}, the nbgrader course in {args.out / 'nbgrader'} "
          f"({sum(points.values())} points in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
