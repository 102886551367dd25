"""The study's summary: `results/README.md`, rendered from the run files alone."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

from .. import checkpoint, data, metrics, protocol
from ..config import repo_root
from ..compare import mean_std

REFERENCE = "full"  # the method every other is compared with

HEADER = """# Results: every method at convergence

Written by `make study` (`python -m pefttutor.study`) from the JSON files in this folder, one per
run: config, train-loss curve, validation curve, test metric at the best validation point and at
the end, cost, provenance. The protocol is `pefttutor/protocol.py`; the experiments are
`pefttutor/study/experiments.py`. Test metric: mean ± std over seeds at the best validation point;
`se` is the test set's standard error (binomial for accuracy, bootstrap for BLEU), averaged over
seeds. `Δ vs full` is the difference of the seed means from full finetuning's, in points, ± its
standard error: the test set's share from a paired bootstrap over the test items for accuracy
(both methods' predictions on the same resampled items; unpaired, so larger, for BLEU), the
seeds' share from their spread; `≈` marks a
difference within two standard errors (indistinguishable). `test at the end`: the same metric for the weights
of the last step (no model selection). `late gain`: how much the last two
evaluations raised the best validation metric (accuracy points; for SmolLM2, lowered the loss),
the largest over seeds: near 0 means the run had reached its plateau, also when it stopped at
the cap.
"""


def load_all(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))]


def _fmt(values: list[float], digits: int) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _score(task: str, key: str) -> tuple[Any, list]:
    """(metric(predictions, gold), gold items of the whole test split) of a task's headline metric."""
    if task == "minilm-tweets":
        return metrics.accuracy, [ex["label"] for ex in data.load_tweets("test")]
    return (metrics.bleu if key == "BLEU" else metrics.rouge_l), [ex["refs"] for ex in data.load_restaurants("test")]


def gap(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str, n_resamples: int = 200,
        seed: int = 0) -> tuple[float, float]:
    """Seed-mean test `key` of runs `a` minus runs `b`, in points, and its standard error (see HEADER).

    The paired bootstrap is used for accuracy (cheap per resample); for BLEU / ROUGE-L, and
    without stored predictions, the test share is the unpaired sqrt(se_a^2 + se_b^2), which is
    larger (a conservative error: it ignores that both are scored on the same items)."""
    scale = 100.0 if key == "accuracy" else 1.0
    mean = lambda rs: statistics.fmean(r["best"]["test"][key] for r in rs)  # noqa: E731
    diff = scale * (mean(a) - mean(b))
    seeds = sum(statistics.variance([r["best"]["test"][key] for r in rs]) / len(rs) for rs in (a, b) if len(rs) > 1)
    preds = [[r["best"]["test"].get("predictions") for r in rs] for rs in (a, b)]
    task = a[0]["config"]["task"]
    metric, gold = _score(task, key)
    if key == "accuracy" and all(p is not None and len(p) == len(gold) for ps in preds for p in ps):
        rng, n, diffs = random.Random(seed), len(gold), []
        for _ in range(n_resamples):
            idx = [rng.randrange(n) for _ in range(n)]
            g = [gold[i] for i in idx]
            m = [statistics.fmean(metric([p[i] for i in idx], g) for p in ps) for ps in preds]
            diffs.append(m[0] - m[1])
        test = statistics.stdev(diffs)
    else:
        test = math.hypot(*(statistics.fmean(r["best"]["test"][f"{key}_se"] for r in rs) for rs in (a, b)))
    return diff, scale * math.sqrt(test**2 + seeds)


def indistinguishable(gap: tuple[float, float]) -> bool:
    """Whether a difference (points, standard error) from `gap` is within two standard errors of 0."""
    d, se = gap
    return abs(d) < 2 * se


def format_gap(gap: tuple[float, float] | None, mark: str = " ≈", missing: str = "—", unit: str = "") -> str:
    """`gap` as "+0.5 ± 0.5" (then `unit`), followed by `mark` where it is within noise (`indistinguishable`)."""
    if gap is None:
        return missing
    d, se = gap
    return f"{d:+.1f} ± {se:.1f}{unit}" + (mark if indistinguishable(gap) else "")


def late_gain(record: dict[str, Any], last: int = 2) -> float | None:
    """How much the last `last` evaluations improved the best validation metric (points for accuracy,
    nats for loss; > 0 = still improving): the plateau check of a run that stopped at its cap."""
    values = [m[record["metric"]] for _, m in record["validation_curve"]]
    if len(values) <= last:
        return None
    pick = max if record["mode"] == "max" else min
    gain = pick(values) - pick(values[:-last])
    scale = 100.0 if record["metric"] == "accuracy" else 1.0
    return scale * (gain if record["mode"] == "max" else -gain)


def _by_name(records: list[dict[str, Any]], order: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Runs grouped by method name, in `order` (others last), each group by seed."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: (order.index(r["config"]["name"]) if r["config"]["name"] in order
                                            else len(order), r["config"]["seed"])):
        by_name.setdefault(r["config"]["name"], []).append(r)
    return by_name


def summary(records: list[dict[str, Any]], key: str, order: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per method of a task's runs: the seeds' test `key` at the best validation point
    (values, mean, std), the test set's standard error, the gap to full finetuning (`gap`), and
    the cost: what both `results/README.md` and the notebooks show."""
    by_name = _by_name(records, order or [])
    ref = by_name.get(REFERENCE)
    rows = []
    for name, rs in by_name.items():
        c = rs[0]["cost"]
        med = lambda k: statistics.median(r["cost"][k] for r in rs) if c[k] is not None else None  # noqa: E731
        values = [r["best"]["test"][key] for r in rs]
        mean, std = mean_std(values)
        gains = [g for g in (late_gain(r) for r in rs) if g is not None]
        rows.append({
            "method": name, "lr": rs[0]["config"]["lr"], "seeds": len(rs), "values": values, "mean": mean,
            "std": std if len(rs) > 1 else None, "se": statistics.fmean(r["best"]["test"][key + "_se"] for r in rs),
            "gap": None if ref is None or name == REFERENCE else gap(rs, ref, key),
            "end": [r["end"]["test"][key] for r in rs],
            "steps_to_best": [r["best"]["step"] for r in rs], "stopped": sorted({r["stopped"] for r in rs}),
            "late_gain": max(gains) if gains else None,
            "trainable": c["trainable_params"], "stored": c["stored_params"], "file_bytes": c["file_bytes"],
            "step_s": med("median_step_s"), "peak_mb": med("peak_memory_mb"), "latency_ms": c["latency_ms"],
            "train_time_s": statistics.fmean(r["total_time_s"] for r in rs), "runs": rs,
        })
    return rows


def _final_table(records: list[dict[str, Any]], keys: list[tuple[str, int]], order: list[str]) -> list[str]:
    cols = ["method", "lr", "seeds"] + [f"test {k}" for k, _ in keys] + [f"{keys[0][0]} se", "Δ vs full",
            f"test {keys[0][0]} at the end", "steps to best",
            "stopped", "late gain", "trainable", "stored", "file (KB)", "step (ms)", "peak MB", "latency (ms)", "train time (s)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    (key, digits), others = keys[0], keys[1:]
    for s in summary(records, key, order):
        row = [s["method"], f"{s['lr']:g}", str(s["seeds"]), _fmt(s["values"], digits)]
        row += [_fmt([r["best"]["test"][k] for r in s["runs"]], d) for k, d in others]
        row.append(f"{s['se']:.{digits}f}")
        row.append(format_gap(s["gap"], missing=""))
        row.append(_fmt(s["end"], digits))
        row += [", ".join("—" if step is None else str(step) for step in s["steps_to_best"]), ", ".join(s["stopped"]),
                "" if s["late_gain"] is None else f"{s['late_gain']:+.2f}",
                f"{s['trainable']:,}", f"{s['stored']:,}", f"{s['file_bytes'] / 1e3:,.1f}",
                "" if s["step_s"] is None else f"{1000 * s['step_s']:.0f}",
                "" if s["peak_mb"] is None else f"{s['peak_mb']:.0f}",
                f"{s['latency_ms']:.1f}", f"{s['train_time_s']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def best_rate(sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep run with the best validation metric (the first of equals): the rate the final runs use."""
    best = sweep[0]
    for r in sweep[1:]:
        if protocol.improved(r["best"]["validation"][r["metric"]], best["best"]["validation"][r["metric"]], r["mode"]):
            best = r
    return best


def _sweep_table(records: list[dict[str, Any]], order: list[str]) -> list[str]:
    """Every sweep run by method and rate; the chosen rate (best validation) in bold."""
    lines = ["| method | rate | best validation | at step |", "|---|---|---|---|"]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_name.setdefault(r["config"]["name"], []).append(r)
    for name in sorted(by_name, key=lambda n: order.index(n) if n in order else len(order)):
        rs = sorted(by_name[name], key=lambda r: r["config"]["lr"])
        key, best = rs[0]["metric"], best_rate(rs)
        for r in rs:
            mark = "**" if r is best else ""
            lines.append(f"| {name} | {mark}{r['config']['lr']:g}{mark} | {r['best']['validation'][key]:.4f} | "
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
        extended = len([r for r in mine if r["config"].get("extends")])
        out.append(f"## {task}\n\n{len([e for e in planned if e['id'] in done])} of {len(planned)} planned runs done"
                   + (f", and {extended} sweep extension{'s' * (extended != 1)} past an edge of a grid" if extended else "")
                   + f"; {sum(r['total_time_s'] for r in mine) / 60:.0f} min of compute in all"
                   f" (devices: {', '.join(sorted({r['provenance']['device'] for r in mine})) or 'none'}).\n")
        order = list(dict.fromkeys(e["name"] for e in planned))
        for group, title in (("final", "Converged runs (bf16 autocast in training where the device has native "
                                       "bf16 kernels; test in fp32)"),
                             ("fp32", "The same runs without autocast (fp32 throughout)"),
                             ("longer", "The same runs with twice the cap (6 epochs): the plateau check"),
                             ("rank", "LoRA on Wq, Wv at other ranks, alpha fixed at 16 or alpha = 2r (seed 0)")):
            rs = [r for r in mine if r["config"]["group"] == group]
            if rs:
                out += [f"### {title}\n", *_final_table(rs, keys, order), ""]
                in_fp32 = [r["config"]["id"] for r in rs if r["config"]["autocast"] and r.get("autocast_used", "") is None]
                if in_fp32:
                    out += [f"Trained in fp32 (no native bf16 on their device, see `train.native_bf16`): "
                            f"{', '.join(f'`{i}`' for i in in_fp32)}.\n"]
        sweep = [r for r in mine if r["config"]["group"] == "sweep"]
        if sweep:
            out += ["### Learning-rate sweep (seed 0, 1 epoch; for `features` the rate is the logistic "
                    "regression's C; the chosen rate in bold)\n", *_sweep_table(sweep, order), ""]
    if records:
        p = provenance(records)
        out += ["## Provenance\n", f"- machines: {'; '.join(p['machines'])}", f"- commits: {', '.join(p['commits'])}",
                f"- dates: {p['dates'][0]} to {p['dates'][1]}", ""]
    return "\n".join(out)


def quality_rows(rows: list[dict[str, Any]], key: str, digits: int, labels: dict[str, str]) -> list[dict[str, Any]]:
    """`summary` rows as the notebooks show them: method, seeds, test mean ± std, the test se and the gap to
    full finetuning with ", indistinguishable" where it is within noise (pass to `pandas.DataFrame`)."""
    return [{"method": labels.get(r["method"], r["method"]), "seeds": r["seeds"],
             f"test {key}": f"{r['mean']:.{digits}f}" + ("" if r["std"] is None else f" ± {r['std']:.{digits}f}"),
             "test se": round(r["se"], digits), "Δ vs full (points)": format_gap(r["gap"], ", indistinguishable")}
            for r in rows]


def sweep_rows(records: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    """A task's sweep runs as the notebooks show them, by method and rate: the best validation metric, its
    step, and which rate was chosen (the best; the final runs use it). Pass to `pandas.DataFrame`."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["config"]["lr"]):
        by_name.setdefault(r["config"]["name"], []).append(r)
    out = []
    for name, rs in by_name.items():
        best = best_rate(rs)
        out += [{"method": labels.get(name, name), "rate": f"{r['config']['lr']:g}",
                 f"best validation {r['metric']}": round(r["best"]["validation"][r["metric"]], 4),
                 "at step": r["best"]["step"], "chosen": "yes" if r is best else ""} for r in rs]
    return out


def provenance(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Where runs came from: machines (device, CPU or GPU, threads, torch), commits, first and last date."""
    provs = [r["provenance"] for r in records]
    dates = sorted(p["date"] for p in provs)
    return {"machines": sorted({f"{p['device']} ({p['device_name']}, {p['threads']} threads), torch {p['torch']}"
                                for p in provs}),
            "commits": sorted({p["git_commit"][:12] for p in provs}), "dates": (dates[0], dates[-1])}


def runs(task: str, group: str = "final", folder: Path | None = None) -> list[dict[str, Any]]:
    """The committed runs of `task` in `group` ("final", "fp32", "longer", "rank" or "sweep"): what notebooks read, in
    fast mode too (the study's fast mode writes elsewhere)."""
    return [r for r in load_all(folder or repo_root() / "results")
            if r["config"]["task"] == task and r["config"]["group"] == group]


def write_readme(folder: Path, all_experiments: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "README.md"
    checkpoint.write_atomic(path, render(folder, all_experiments).encode())
    return path
