"""Run the study's experiments: each one trains a fresh model under its task's protocol and writes
one JSON file under the results folder. Idempotent (a finished run with the same config is
skipped), resumable (files are written atomically when a run ends, so an interrupted study starts
again at the first run without a result, and a half-written file is never read), device-agnostic.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from .. import checkpoint, compare, config, data, protocol, train
from ..models.bert import mean_pool
from . import experiments, methods, report

_TASKS: dict[tuple[str, str], Any] = {}  # (task, device) -> protocol object: models load once per process


def results_dir() -> Path:
    """`results/` in the checkout for full mode; a scratch folder in the cache for fast mode."""
    return config.cache_dir() / "study-fast" if config.is_fast() else config.repo_root() / "results"


def path_of(exp_id: str, folder: Path) -> Path:
    return folder / f"{exp_id}.json"


def read(exp_id: str, folder: Path) -> dict[str, Any] | None:
    """A finished run's record, or None. Only whole files exist (see `write`)."""
    path = path_of(exp_id, folder)
    return json.loads(path.read_text()) if path.exists() else None


def write(record: dict[str, Any], folder: Path) -> Path:
    """Write atomically: a temporary file in the same folder, then a rename."""
    path = path_of(record["config"]["id"], folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=config.repo_root(), capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(device: torch.device) -> dict[str, Any]:
    """Where and with what a run was made."""
    import transformers

    changed = _git("status", "--porcelain", "--", "pefttutor")
    # "XY path" lines; _git strips the output, so the first line may have lost its leading space
    changed = [] if changed in ("", "unknown") else [line.split(maxsplit=1)[1] for line in changed.splitlines()]
    return {
        "git_commit": _git("rev-parse", "HEAD") + ("+uncommitted" if changed else ""),
        "uncommitted": changed,  # the package's files that differed from that commit
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "dtype": "float32",
        "mode": "fast" if config.is_fast() else "full",
    }


def get_task(name: str, device: torch.device):
    key = (name, str(device))
    if key not in _TASKS:
        _TASKS[key] = protocol.task(name, device)
    return _TASKS[key]


class NeedsExtension(LookupError):
    """The sweep's best rate is at an edge of its grid: `self.exp` is the next rate past that edge."""

    def __init__(self, exp: dict[str, Any]):
        super().__init__(f"the sweep needs {exp['id']}")
        self.exp = exp


MAX_EXTENSIONS = 2  # rates added past each edge of a grid, at most


def _half_decade(x: float) -> float:
    """The nearest value of the grid ... 1e-4, 3e-4, 1e-3, 3e-3 ... (in log scale)."""
    candidates = [m * 10.0**k for k in range(math.floor(math.log10(x)) - 1, math.floor(math.log10(x)) + 2)
                  for m in (1, 3)]
    return float(f"{min(candidates, key=lambda c: abs(math.log(c / x))):.0e}")


def extension(sweep: list[dict[str, Any]], rate: float) -> dict[str, Any]:
    """A sweep run like `sweep[0]` at `rate` (its id names the rate)."""
    base = sweep[0]
    return {**base, "id": experiments.run_id(base["task"], "sweep", base["name"], base["seed"], rate), "lr": rate,
            "extends": [e["id"] for e in sweep]}


def sweep_runs(exp: dict[str, Any], all_experiments: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """The sweep of a final run: its grid, plus the runs that extended the grid, found on disk."""
    sweep = experiments.sweep_of(exp, all_experiments)
    if not sweep:
        return []
    known = {e["id"] for e in sweep}
    pattern = f"{sweep[0]['name']}_lr*_s{sweep[0]['seed']}.json"
    for path in sorted((folder / exp["task"] / "sweep").glob(pattern)):
        record = json.loads(path.read_text())
        if record["config"]["id"] not in known and record["config"].get("extends"):
            sweep.append(record["config"])
    return sorted(sweep, key=lambda e: e["lr"])


def resolve(exp: dict[str, Any], all_experiments: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    """The experiment with `lr: "sweep"` replaced by the sweep's best rate (and where it came from).

    Raises LookupError while a sweep run has no result yet, and NeedsExtension when the best rate
    is at an edge of the grid (the rate past it is tried first, up to MAX_EXTENSIONS per edge)."""
    if exp["lr"] != "sweep":
        return exp
    sweep = sweep_runs(exp, all_experiments, folder)
    records = [read(e["id"], folder) for e in sweep]
    missing = [e["id"] for e, r in zip(sweep, records) if r is None]
    if missing or not sweep:
        raise LookupError(f"{exp['id']} needs its learning-rate sweep first: {missing or 'no sweep defined'}")
    best = records.index(report.best_rate(records))
    grid = experiments.sweep_of(exp, all_experiments)
    lo, hi = min(e["lr"] for e in grid), max(e["lr"] for e in grid)
    rates = [e["lr"] for e in sweep]
    if best == len(sweep) - 1 and sum(r > hi for r in rates) < MAX_EXTENSIONS:
        raise NeedsExtension(extension(sweep, _half_decade(rates[-1] * math.sqrt(10))))
    if best == 0 and sum(r < lo for r in rates) < MAX_EXTENSIONS:
        raise NeedsExtension(extension(sweep, _half_decade(rates[0] / math.sqrt(10))))
    return {**exp, "lr": records[best]["config"]["lr"], "lr_from": [e["id"] for e in sweep]}


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def _stored(model: nn.Module, spec: dict[str, Any]) -> tuple[int, int]:
    """(bytes, parameters) of what the task stores for this method (see `methods.save`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.safetensors"
        methods.save(model, spec, path)
        with safe_open(path, "pt") as f:
            n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        return path.stat().st_size, n


def _train_run(exp: dict[str, Any], task, device: torch.device) -> dict[str, Any]:
    spec = exp["spec"]
    # the study's bf16 runs use it where the device has native bf16 kernels; elsewhere fp32 (recorded):
    # bf16 on a CPU without them is tens of times slower, and the `fp32` group shows it changes nothing
    autocast = train.resolve_autocast(device, train.AUTO) if exp["autocast"] == "bf16" else exp["autocast"]
    budget = task.budget(exp["epochs"])
    model = methods.build(task.new_model(exp["seed"]), spec).to(device)
    best: dict[str, Any] = {}

    def validate(m: nn.Module) -> dict[str, float]:
        with train.autocast_context(device, autocast):  # selection only; the test runs in fp32
            scores = task.validate(m)
        value = scores[task.metric]
        if not best or protocol.improved(value, best["value"], task.mode):
            best.update(value=value, state=_trainable_state(m), validation=scores)
        return {k: v for k, v in scores.items() if isinstance(v, (int, float))}

    stop = lambda curve: protocol.plateaued(curve, task.metric, task.mode, budget.patience)  # noqa: E731
    r = train.train(model, task.train_batches(exp["seed"]), task.loss, steps=budget.max_steps, lr=exp["lr"],
                    warmup=budget.warmup, evaluate=validate, eval_every=budget.eval_every, seed=exp["seed"],
                    device=device, progress=False, autocast=autocast, should_stop=stop)
    best_step = next(s for s, m in r.eval_curve if m[task.metric] == best["value"])  # the first: strict improvement
    if best_step == r.steps:  # the weights already are the best: one test pass (SmolLM2's takes minutes)
        test_best = task.evaluate(model, "test", predictions=True)
        test_end = {k: v for k, v in test_best.items() if k != "predictions"}
    else:
        test_end = task.evaluate(model, "test")
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in best["state"]:
                    p.copy_(best["state"][k])
        test_best = task.evaluate(model, "test", predictions=True)
    methods.for_inference(model, spec)
    file_bytes, stored = _stored(model, spec)
    return {
        "steps": r.steps, "max_steps": budget.max_steps, "eval_every": budget.eval_every, "patience": budget.patience,
        "stopped": "plateau" if r.steps < budget.max_steps else "cap", "autocast_used": autocast,
        "loss_curve": [round(x, 5) for x in r.loss_curve],
        "validation_curve": [[s, m] for s, m in r.eval_curve],
        "best": {"step": best_step, "validation": best["validation"], "test": test_best},
        "end": {"step": r.steps, "validation": r.eval_curve[-1][1], "test": test_end},
        "cost": {"wall_time_s": r.wall_time_s, "median_step_s": r.median_step_s, "peak_memory_mb": r.peak_memory_mb,
                 "trainable_params": r.trainable_params, "total_params": r.total_params,
                 "stored_params": stored, "file_bytes": file_bytes,
                 "latency_ms": compare.latency_ms(model, task.latency_batch())["median"]},
    }


@torch.no_grad()
def _embed(task, split: str) -> np.ndarray:
    examples = task.train_set if split == "train" else task.splits[split]
    out = []
    for b in data.classification_batches(examples, task.tokenizer, task.eval_batch_size, task.max_length):
        b = {k: v.to(task.device) for k, v in b.items()}
        out.append(mean_pool(task.encoder(b["input_ids"], b["attention_mask"]), b["attention_mask"]).float().cpu())
    return torch.cat(out).numpy()


def _features_run(exp: dict[str, Any], task, device: torch.device) -> dict[str, Any]:
    """The feature-based approach: a logistic regression (inverse regularisation C = exp["lr"]) on
    frozen mean-pooled MiniLM embeddings, fitted to convergence on every training tweet."""
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    X, y = _embed(task, "train"), [ex["label"] for ex in task.train_set]
    clf = LogisticRegression(C=exp["lr"], max_iter=5000, random_state=exp["seed"]).fit(X, y)
    scores, preds = {}, {}
    for split in task.splits:
        preds[split] = clf.predict(_embed(task, split)).tolist()
        scores[split] = protocol.classification_scores(preds[split], [ex["label"] for ex in task.splits[split]])
    n = clf.coef_.size + clf.intercept_.size
    return {
        "steps": int(np.max(clf.n_iter_)), "max_steps": 5000, "stopped": "converged", "loss_curve": [],
        "validation_curve": [], "best": {"step": None, "validation": scores["validation"],
                                         "test": {**scores["test"], "predictions": preds["test"]}},
        "end": {"step": None, "validation": scores["validation"], "test": scores["test"]},
        "cost": {"wall_time_s": time.perf_counter() - start, "median_step_s": None, "peak_memory_mb": None,
                 "trainable_params": n, "total_params": n + sum(p.numel() for p in task.encoder.parameters()),
                 "stored_params": n, "file_bytes": 4 * n,
                 "latency_ms": compare.latency_ms(task.encoder, task.latency_batch())["median"]},
    }


def _untuned_run(exp: dict[str, Any], task, device: torch.device) -> dict[str, Any]:
    """The baseline: the instruct model, untrained, prompted with its chat template and an instruction."""
    start = time.perf_counter()
    model = task.new_model(exp["seed"])
    validation = task.evaluate(model, "validation", chat=True, se=False)
    test = task.evaluate(model, "test", chat=True, predictions=True)
    return {
        "steps": 0, "max_steps": 0, "stopped": "untrained", "loss_curve": [], "validation_curve": [],
        "best": {"step": 0, "validation": validation, "test": test}, "end": {"step": 0, "validation": validation, "test": test},
        "cost": {"wall_time_s": time.perf_counter() - start, "median_step_s": None, "peak_memory_mb": None,
                 "trainable_params": 0, "total_params": sum(p.numel() for p in model.parameters()),
                 "stored_params": 0, "file_bytes": 0,
                 "latency_ms": compare.latency_ms(model, task.latency_batch())["median"]},
    }


RUNS = {"features": _features_run, "untuned": _untuned_run}  # methods that do not train with `train`


def run_one(exp: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Run one resolved experiment; return its record (config, results, provenance)."""
    task = get_task(exp["task"], device)
    start = time.perf_counter()
    run = RUNS.get(exp["spec"]["method"], _train_run)
    result = run(exp, task, device)
    return {"config": exp, "metric": task.metric, "mode": task.mode, **result,
            "total_time_s": time.perf_counter() - start, "provenance": provenance(device)}


def select(all_experiments: list[dict[str, Any]], only: str | None, seeds: tuple[int, ...] | None) -> list[dict[str, Any]]:
    """Filter by id (`only`: a glob, or a substring when it has no * ? [) and by seed of final runs."""
    out = all_experiments
    if only:
        pattern = only if any(c in only for c in "*?[") else f"*{only}*"
        out = [e for e in out if fnmatch.fnmatch(e["id"], pattern)]
    if seeds is not None:
        out = [e for e in out if e["group"] == "sweep" or e["seed"] in seeds]
    return out


def _same_run(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a stored config is this run (which sweep files chose the rate is provenance, not config)."""
    drop = lambda c: {k: v for k, v in c.items() if k != "lr_from"}  # noqa: E731
    return drop(stored) == drop(wanted)


def status(exp: dict[str, Any], all_experiments: list[dict[str, Any]], folder: Path) -> str:
    """"done", "stale" (a result from another config: rerun), "waiting" (sweep unfinished) or "todo"."""
    try:
        resolved = resolve(exp, all_experiments, folder)
    except NeedsExtension:
        raise
    except LookupError:
        return "waiting"
    record = read(exp["id"], folder)
    if record is None:
        return "todo"
    return "done" if _same_run(record["config"], resolved) else "stale"


def _run_and_write(exp: dict[str, Any], folder: Path, device: torch.device, log: Callable[[str], None],
                   prefix: str) -> None:
    log(f"{prefix} {exp['id']} (lr {exp['lr']:g}) ...")
    record = run_one(exp, device)
    write(record, folder)
    shown = {k: round(v, 4) for k, v in record["best"]["test"].items() if isinstance(v, float)}
    log(f"    {record['stopped']} after {record['steps']} steps, {record['total_time_s']:.0f} s; test at best: {shown}")


def run_study(chosen: list[dict[str, Any]], all_experiments: list[dict[str, Any]], folder: Path,
              device: torch.device, log: Callable[[str], None] = print,
              after_each: Callable[[], None] | None = None) -> dict[str, int]:
    """Run every chosen experiment that has no up-to-date result; return counts by outcome.
    A final run whose sweep's best rate is at an edge of the grid first runs the sweep's extension."""
    counts = {"ran": 0, "skipped": 0, "waiting": 0}
    for i, exp in enumerate(chosen, 1):
        prefix = f"[{i}/{len(chosen)}]"
        while True:
            try:
                state = status(exp, all_experiments, folder)
                break
            except NeedsExtension as need:  # status() lets it through: running it is our job
                log(f"{prefix} the sweep's best rate is at an edge of its grid: extending it")
                _run_and_write(need.exp, folder, device, log, prefix)
                counts["ran"] += 1
        if state == "done":
            counts["skipped"] += 1
            continue
        if state == "waiting":
            counts["waiting"] += 1
            log(f"{prefix} {exp['id']}: waiting for its sweep (run it first, or drop --only)")
            continue
        _run_and_write(resolve(exp, all_experiments, folder), folder, device, log, prefix)
        counts["ran"] += 1
        if after_each is not None:
            after_each()
    return counts


def main(argv: list[str] | None = None) -> int:
    import argparse

    from . import report

    parser = argparse.ArgumentParser(prog="python -m pefttutor.study", description=__doc__)
    parser.add_argument("--list", action="store_true", help="list the experiments and their status, run nothing")
    parser.add_argument("--only", help="run only experiments whose id matches (glob, or substring)")
    parser.add_argument("--seeds", help="final runs of these seeds only, e.g. 0 or 0,1,2")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    parser.add_argument("--results", type=Path, help="results folder (default: results/, fast mode: a scratch folder)")
    parser.add_argument("--report", action="store_true", help="only rewrite the results folder's README.md")
    args = parser.parse_args(argv)
    folder = args.results or results_dir()
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    all_exps = experiments.experiments()
    chosen = select(all_exps, args.only, seeds)
    if args.report:
        report.write_readme(folder, all_exps)
        return 0
    if args.list:
        for e in chosen:
            try:
                state = status(e, all_exps, folder)
            except NeedsExtension as need:
                state = f"extend ({need.exp['id']} first)"
            print(f"{state:8s} {e['id']}")
        return 0
    device = config.get_device(args.device)
    print(f"{len(chosen)} experiments, results in {folder}, device {device}")
    counts = run_study(chosen, all_exps, folder, device, after_each=lambda: report.write_readme(folder, all_exps))
    report.write_readme(folder, all_exps)
    print(f"ran {counts['ran']}, skipped {counts['skipped']} (done), waiting {counts['waiting']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
