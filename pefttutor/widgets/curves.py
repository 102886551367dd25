"""Learning curves of the study's committed runs (notebook 06): `results/<task>/final/*.json`."""

from __future__ import annotations

import html
import statistics
from collections.abc import Sequence
from pathlib import Path

from ipywidgets import Dropdown, IntSlider, SelectMultiple, ToggleButtons

from .. import plots
from ..config import repo_root
from ..study import experiments, report
from .panel import Panel, set_options

SHOWN_FIRST = 5  # methods selected when a task is chosen


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each step (fewer at the start)."""
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def curve(record: dict, x: str, y: str, smooth: int = 1) -> tuple[list[float], list[float]]:
    """One run's curve: y "validation" (the task's model-selection metric at each evaluation) or
    "train" (the loss of every step, `running_mean` over `smooth` steps), against x "step" or
    "time": step x the run's median step time, an estimate (the files keep no per-step times;
    evaluations are not counted)."""
    if y == "validation":
        steps, ys = zip(*[(s, m[record["metric"]]) for s, m in record["validation_curve"]])
    else:
        steps, ys = range(1, len(record["loss_curve"]) + 1), running_mean(record["loss_curve"], smooth)
    per_step = record["cost"]["median_step_s"] if x == "time" else 1
    return [s * per_step for s in steps], list(ys)


def learning_curves(methods: Sequence[str] = (), folder: Path | None = None) -> Panel:
    """The curves of the study's final runs (every seed), by task and method: validation metric or
    train loss against steps or estimated training time (`curve`). `methods`: those selected at
    first, wherever a task has them (else its first few). Runs without curves (frozen features,
    the untuned model) are left out. State: "lines", one dict per run (run id, method, seed, x,
    y), and the axis labels."""
    folder = folder or repo_root() / "results"
    records = [r for r in report.load_all(folder) if r["config"]["group"] == "final" and r["loss_curve"]]
    by_task: dict[str, dict[str, list[dict]]] = {}  # task -> method -> its runs by seed, in the study's order
    for e in experiments.experiments():
        if e["group"] == "final" and e["name"] not in by_task.get(e["task"], {}):
            runs = sorted((r for r in records if (r["config"]["task"], r["config"]["name"]) == (e["task"], e["name"])),
                          key=lambda r: r["config"]["seed"])
            if runs:
                by_task.setdefault(e["task"], {})[e["name"]] = runs
    if not by_task:
        raise ValueError(f"no finished study runs with learning curves in {folder}")
    controls = {
        "task": Dropdown(options=list(by_task), description="task"),
        "methods": SelectMultiple(rows=6, description="methods"),  # options: the task's (link)
        "x": ToggleButtons(options=[("steps", "step"), ("training time (estimate)", "time")], description="x"),
        "y": ToggleButtons(options=[("validation metric", "validation"), ("train loss", "train")], description="y"),
        "smooth": IntSlider(value=20, min=1, max=100, description="mean of", continuous_update=False),
    }

    def link(c):
        names = list(by_task[c["task"].value])
        set_options(c["methods"], names, fallback=[m for m in methods if m in names] or names[:SHOWN_FIRST])

    def uses(values):
        return {"task", "methods", "x", "y"} | ({"smooth"} if values["y"] == "train" else set())

    def compute(task, methods, x, y, smooth=1):
        runs = [r for name in methods for r in by_task[task][name]]
        lines = [dict(zip(("x", "y"), curve(r, x, y, smooth)), run=r["config"]["id"], method=r["config"]["name"],
                      seed=r["config"]["seed"]) for r in runs]
        metric = runs[0]["metric"] if runs else ""
        return {"task": task, "lines": lines, "estimated time": x == "time",
                "xlabel": "step" if x == "step" else "training time (s), estimated: step x median step time",
                "ylabel": f"validation {metric}" if y == "validation"
                else "train loss" + (f" (mean of the last {smooth} steps)" if smooth > 1 else "")}

    return Panel(controls, compute, _draw, uses, link)


def _draw(s):
    fig, ax = plots.figure(width=8, height=4)
    seen = set()
    for line in s["lines"]:
        first = line["method"] not in seen
        seen.add(line["method"])
        seeds = sum(other["method"] == line["method"] for other in s["lines"])
        ax.plot(line["x"], line["y"], color=plots.method_color(line["method"]), lw=1, alpha=0.8, gid=line["run"],
                label=f"{line['method']} ({seeds} seed{'s' * (seeds > 1)})" if first else None)
    ax.set_xlabel(s["xlabel"])
    ax.set_ylabel(s["ylabel"])
    ax.set_title(f"{s['task']}: the study's runs, one line per seed")
    if s["lines"]:
        ax.legend(fontsize=8)
    n, task = len(s["lines"]), html.escape(s["task"])
    text = f"<b>{task}</b>: {n} run{'s' * (n != 1)} from <code>results/{task}/final/</code>."
    if s["estimated time"]:
        text += (" Training time is estimated as step x the run's median step time: the files keep no per-step "
                 "times, evaluations are not counted, and the runs did not all run on the same CPU "
                 "(results/README.md).")
    return text, fig
