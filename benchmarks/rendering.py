"""RESULTS.md from results.json (and the other benchmarks' JSON): the prose comes from
RESULTS.template.md, the tables and the checked targets from the records."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from methods import IMPLS, METHODS, VARIANTS, base_key, label

TEMPLATE = Path(__file__).resolve().parent / "RESULTS.template.md"
WEIGHTS = {"real": "the real checkpoints (SmolLM2-135M-Instruct, all-MiniLM-L6-v2)",
           "random": "random weights with the real models' shapes",
           "tiny": "tiny random models (a test run: the numbers mean nothing)"}


@functools.cache
def _parts() -> dict[str, str]:
    """The template's parts by name: from a `<!-- name -->` line to the next, less trailing blank lines."""
    chunks = re.split(r"^<!-- ([\w:]+) -->\n", TEMPLATE.read_text(), flags=re.M)
    return {name: text.rstrip("\n") for name, text in zip(chunks[1::2], chunks[2::2])}


def _part(name: str, **fields) -> list[str]:
    return _parts()[name].format(**fields).split("\n")


def _index(records: list[dict]) -> dict[tuple, dict]:
    return {(r["section"], r["impl"], r["model"], r["method"], r["batch"], r["seq_len"], r["metric"]): r
            for r in records}


def _fmt(x: float, metric: str) -> str:
    if metric == "step_time_s":
        return f"{1e3 * x:,.0f}" if x >= 0.1 else f"{1e3 * x:,.1f}"
    if metric == "latency_ms":
        return f"{x:,.1f}" if x >= 10 else f"{x:,.2f}"
    if metric == "latency_vs_base":
        return f"{x:.3f}"
    if metric == "trainable_params":
        return f"{x:,.0f}"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3f}"  # MB


def _cell(r: dict | None, metric: str) -> str:
    if r is None:
        return "—"
    if r["runs"] == 1:
        return _fmt(r["median"], metric)
    return f"{_fmt(r['median'], metric)} ({_fmt(r['min'], metric)}–{_fmt(r['max'], metric)})"


def _ratio(a: dict | None, b: dict | None, key: str = "median") -> str:
    return "—" if a is None or b is None or not b[key] else f"{a[key] / b[key]:.2f}x"


# A row's cells from `g`, its records by (impl, metric): both implementations' values, and their ratio.


def _both(g: dict, metric: str, fmt: str | None = None) -> list[str]:
    return [_cell(g[impl, metric], fmt or metric) for impl in IMPLS]


def _slashed(g: dict, metric: str, fmt: str | None = None) -> str:
    return " / ".join(_both(g, metric, fmt))


def _ratios(g: dict, metric: str, keys: tuple[str, ...] = ("median",)) -> str:
    return " / ".join(_ratio(g["pefttutor", metric], g["peft", metric], key) for key in keys)


def _memory(g: dict) -> list[str]:
    return [*_both(g, "peak_memory_mb", "mb"), _ratios(g, "peak_memory_mb"), _slashed(g, "step_memory_mb", "mb")]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render(result: dict, extras: dict | None = None) -> str:
    """RESULTS.md; `extras` holds the other benchmarks' results (by their JSON's name), each rendered after."""
    m, s, idx = result["machine"], result["settings"], _index(result["records"])
    keys = {(r["section"], r["model"], r["method"], r["batch"], r["seq_len"]) for r in result["records"]}

    def rows(section):
        order = {name: i for i, name in enumerate(VARIANTS if section == "latency" else
                                                  [m + a for a in ("", "+bf16") for m in METHODS])}
        return sorted((k for k in keys if k[0] == section),
                      key=lambda k: (k[1] != "smollm2", k[3], order.get(k[2], len(order)), k[2], k[4]))

    def records(key, metrics):  # key: (section, model, method, B, T)
        sec, model, method, B, T = key
        return {(impl, metric): idx.get((sec, impl, model, method, B, T, metric))
                for impl in IMPLS for metric in metrics}

    lines = _part("header", m=m, s=s, gpu=f", GPU {m['gpu']}" if m.get("gpu") else "",
                  minutes=result["wall_time_s"] / 60, models=WEIGHTS[s.get("weights", "real")]) + [""]
    lines += _targets(result, idx)
    lines += _part("optimized") + [""]

    if train := rows("train"):
        lines += _part("train")
        for key in train:
            g = records(key, ("step_time_s", "peak_memory_mb", "step_memory_mb", "trainable_params"))
            lines.append(_row([key[1], label(key[2]), _slashed(g, "trainable_params"), *_both(g, "step_time_s"),
                               _ratios(g, "step_time_s", ("median", "min")), *_memory(g)]))
        lines.append("")

    if latency := rows("latency"):
        rounds = " " + _part("latency_rounds", s=s)[0] if s.get("latency_seconds") else ""
        lines += _part("latency", s=s, rounds=rounds)
        for key in latency:
            g = records(key, ("latency_ms", "latency_vs_base"))
            lines.append(_row([key[1], label(key[2]), str(key[3]), *_both(g, "latency_ms"),
                               _ratios(g, "latency_ms", ("median", "min")), *_both(g, "latency_vs_base")]))
        lines.append("")

    for section, title, axis in (("scaling_seq", "Scaling with sequence length (LoRA Wq,Wv r=8)", "seq_len"),
                                 ("scaling_rank", "Scaling with LoRA rank (Wq,Wv, alpha = 2r)", "rank")):
        if not (pts := rows(section)):
            continue
        _, model, _, B, T = pts[0]
        where = f"batch {B}" if axis == "seq_len" else f"batch {B} x {T} tokens"
        lines += _part("scaling", title=title, model=model, where=where, s=s, axis=axis)
        x = (lambda k: k[4]) if axis == "seq_len" else (lambda k: int(k[2].rsplit("r", 1)[1]))  # the rank
        for key in sorted(pts, key=x):
            g = records(key, ("step_time_s", "peak_memory_mb", "step_memory_mb"))
            lines.append(_row([str(x(key)), *_both(g, "step_time_s"), _ratios(g, "step_time_s"), *_memory(g)]))
        lines.append("")

    lines += _part("memory") + [""]
    extras = extras or {}
    if "speedups" in extras:
        lines += speedups_section(extras["speedups"])
    if "time_to_accuracy" in extras:
        lines += time_to_accuracy_section(extras["time_to_accuracy"])
    return "\n".join(lines)


def speedups_section(sp: dict) -> list[str]:
    """The table of `benchmarks/speedups.py`'s run (speedups.json)."""
    lines = _part("speedups", m=sp["machine"], steps=sp["steps"])
    for r in sp["rows"]:
        lines.append(f"| {r['speed-up']} | {r['setting']} | {1e3 * r['before']:,.0f} | {1e3 * r['after']:,.0f} |"
                     f" {r['before'] / r['after']:.2f}x |")
    return lines + [""]


def time_to_accuracy_section(tta: dict) -> list[str]:
    """The table of `benchmarks/time_to_accuracy.py`'s run (time_to_accuracy.json)."""
    s, runs = tta["settings"], tta["runs"]
    ref = runs["Trainer + peft, defaults"]["time_to_target_s"], runs["Trainer + peft, best flags"]["time_to_target_s"]
    lines = _part("time_to_accuracy", m=tta["machine"], s=s, targets=", ".join(s["targets"]), target=tta["target"],
                  target_from=", ".join(tta["target_from"]))
    for name, r in runs.items():
        t = r["time_to_target_s"]
        ratio = lambda base: "—" if t is None or base is None else f"{t / base:.2f}x"  # noqa: E731
        lines.append(f"| {name} | {'not reached' if t is None else f'{t:.0f}'} | {ratio(ref[0])} | {ratio(ref[1])} |"
                     f" {r['wall_s']:.0f} | {r['test_accuracy']:.4f} |")
    return lines + [""]


def _targets(result: dict, idx: dict) -> list[str]:
    """The issue's targets, checked against this run's records, and the rows that miss them, with causes."""
    recs = result["records"]
    train = [r for r in recs if r["section"] == "train" and r["impl"] == "pefttutor"]

    def other(r):  # peft's record of what r measured
        return idx.get((r["section"], "peft", r["model"], r["method"], r["batch"], r["seq_len"], r["metric"]))

    lines = _part("targets") + [""]
    over: dict[str, list[dict]] = {}
    for metric, what in (("step_time_s", "training step time"), ("peak_memory_mb", "peak training memory")):
        rows = [r for r in train if r["metric"] == metric and other(r)]
        over[metric] = [r for r in rows if r["median"] > other(r)["median"]]
        listed = [f"{r['model']} {label(r['method'])} {r['median'] / other(r)['median']:.2f}x"
                  f" (min {r['min'] / other(r)['min']:.2f}x)" if metric == "step_time_s" else
                  f"{r['model']} {label(r['method'])} +{r['median'] - other(r)['median']:.3f} MB"
                  f" ({r['median'] / other(r)['median']:.5f}x)" for r in over[metric]]
        lines.append(f"- {what} <= 1.00x peft's: {len(rows) - len(listed)} of {len(rows)} rows"
                     + (f"; above: {'; '.join(listed)}." if listed else "."))
    merged = [r for r in recs if r["section"] == "latency" and r["impl"] == "pefttutor"
              and r["metric"] == "latency_vs_base" and r["method"].endswith("_merged")]
    if merged:
        ok = sum(r["median"] <= 1.03 for r in merged)
        lines.append(f"- merged LoRA, DoRA and IA3 latency within 3% of the base model (pefttutor, median paired ratio): {ok} of"
                     f" {len(merged)} rows: " + ", ".join(
                         f"{r['model']} {r['method'].removesuffix('_merged')} B={r['batch']} {r['median']:.3f}"
                         for r in merged) + ".")
        for r in (r for r in merged if r["median"] > 1.03):
            fastest = (idx[("latency", "pefttutor", r["model"], r["method"], r["batch"], r["seq_len"], "latency_ms")]["min"]
                       / idx[("latency", "pefttutor", r["model"], "base", r["batch"], r["seq_len"], "latency_ms")]["min"])
            lines.append(f"  - {r['model']} {r['method'].removesuffix('_merged')} B={r['batch']} is over: its fastest"
                         f" run is {fastest:.3f}x the base model's fastest"
                         + (f" ({_parts()['merged_noise']})." if fastest <= 1.03 else "."))
    unmerged = [r for r in recs if r["section"] == "latency" and r["metric"] == "latency_vs_base"
                and r["method"] in ("lora_qv", "lora_all", "dora_qv", "ia3") and r["impl"] == "pefttutor"]
    if unmerged:
        lines.append("- unmerged LoRA, DoRA and IA3 latency over the base model, pefttutor / peft: " + ", ".join(
            f"{r['model']} {r['method']} B={r['batch']} {r['median']:.2f}x / "
            + (f"{other(r)['median']:.2f}x" if other(r) else "—") for r in unmerged) + ".")

    for metric, title, causes in (("step_time_s", "Where pefttutor is slower", "slower"),
                                  ("peak_memory_mb", "Where pefttutor uses more memory", "more_memory")):
        methods = sorted({r["method"] for r in over[metric]}, key=lambda m: (list(METHODS).index(base_key(m)), m))
        if methods:
            lines += ["", f"{title}:"]
        for method in methods:
            rows = [r for r in over[metric] if r["method"] == method]
            overlap = all(r["min"] <= other(r)["max"] for r in rows)
            why = _parts().get(f"{causes}:{base_key(method)}") or (
                _parts()["noise"] if all(r["min"] <= other(r)["min"] for r in rows) else
                _parts()["same_profile"] if overlap and metric == "step_time_s" else "no cause found.")
            lines.append(f"- {label(method)}: {why}")
    return lines + [""]
