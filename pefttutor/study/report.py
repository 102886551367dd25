"""The study's summary: `results/README.md`, rendered from the run files alone."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ..compare import mean_std

HEADER = """# Results: every method at convergence

Written by `make study` (`python -m pefttutor.study`) from the JSON files in this folder, one per
run: config, train-loss curve, validation curve, test metric at the best validation point and at
the end, cost, provenance. The protocol is `pefttutor/protocol.py`; the experiments are
`pefttutor/study/experiments.py`. Test metric: mean ± std over seeds at the best validation point;
`se` is the test set's standard error (binomial for accuracy, bootstrap for BLEU), averaged over
seeds. Two methods whose difference is within about two standard errors are indistinguishable.
"""


def load_all(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))]


def _fmt(values: list[float], digits: int) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _final_table(records: list[dict[str, Any]], keys: list[tuple[str, int]]) -> list[str]:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_name.setdefault(r["config"]["name"], []).append(r)
    cols = ["method", "lr", "seeds"] + [f"test {k}" for k, _ in keys] + [f"{keys[0][0]} se", "steps to best",
            "stopped", "trainable", "stored", "file (KB)", "step (ms)", "peak MB", "latency (ms)", "train time (s)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, rs in by_name.items():
        c = rs[0]["cost"]
        med = lambda key: statistics.median(r["cost"][key] for r in rs) if c[key] is not None else None  # noqa: E731
        step, peak = med("median_step_s"), med("peak_memory_mb")
        row = [name, f"{rs[0]['config']['lr']:g}", str(len(rs))]
        row += [_fmt([r["best"]["test"][k] for r in rs], d) for k, d in keys]
        row += [f"{statistics.fmean(r['best']['test'][keys[0][0] + '_se'] for r in rs):.{keys[0][1]}f}"]
        row += [", ".join(str(r["best"]["step"]) for r in rs), ", ".join(sorted({r["stopped"] for r in rs})),
                f"{c['trainable_params']:,}", f"{c['stored_params']:,}", f"{c['file_bytes'] / 1e3:,.1f}",
                "" if step is None else f"{1000 * step:.0f}", "" if peak is None else f"{peak:.0f}",
                f"{c['latency_ms']:.1f}", f"{statistics.fmean(r['total_time_s'] for r in rs):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _sweep_table(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| method | rate | best validation | at step |", "|---|---|---|---|"]
    for r in records:
        key = r["metric"]
        lines.append(f"| {r['config']['name']} | {r['config']['lr']:g} | {r['best']['validation'][key]:.4f} | "
                     f"{r['best']['step']} |")
    return lines


def render(folder: Path, all_experiments: list[dict[str, Any]]) -> str:
    records = load_all(folder)
    done = {r["config"]["id"] for r in records}
    out = [HEADER]
    for task, keys in (("minilm-tweets", [("accuracy", 4), ("macro_f1", 4)]),
                       ("smollm2-restaurants", [("BLEU", 1), ("ROUGE-L", 1)])):
        mine = [r for r in records if r["config"]["task"] == task]
        planned = [e for e in all_experiments if e["task"] == task]
        out.append(f"## {task}\n\n{len([e for e in planned if e['id'] in done])} of {len(planned)} planned runs done.\n")
        for group, title in (("final", "Converged runs (bf16 autocast in training; test in fp32)"),
                             ("fp32", "The same runs without autocast (fp32 throughout)")):
            rs = [r for r in mine if r["config"]["group"] == group]
            if rs:
                out += [f"### {title}\n", *_final_table(rs, keys), ""]
        sweep = [r for r in mine if r["config"]["group"] == "sweep"]
        if sweep:
            out += ["### Learning-rate sweep (seed 0, 1 epoch; for `features` the rate is the logistic "
                    "regression's C)\n", *_sweep_table(sweep), ""]
    provs = [r["provenance"] for r in records]
    if provs:
        machines = sorted({f"{p['device']} ({p['device_name']}, {p['threads']} threads), torch {p['torch']}" for p in provs})
        commits = sorted({p["git_commit"][:12] for p in provs})
        dates = sorted(p["date"] for p in provs)
        out += ["## Provenance\n", f"- machines: {'; '.join(machines)}", f"- commits: {', '.join(commits)}",
                f"- dates: {dates[0]} to {dates[-1]}", ""]
    return "\n".join(out)


def write_readme(folder: Path, all_experiments: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "README.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render(folder, all_experiments))
    tmp.replace(path)
    return path
