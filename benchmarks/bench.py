"""pefttutor against Hugging Face transformers + peft: training step time, peak memory, latency.

One process loads both implementations of a model (pefttutor's from-scratch Llama/Bert and the
transformers model with the same weights), applies the same method to each (pefttutor's module /
peft), and times them on the same batch, interleaved run by run (A B, then B A, ...) after warm-up,
so slow phases of a shared machine hit both alike. Every measurement becomes one record
(impl, model, method, batch, seq_len, metric, median, min, max, runs) in results.json, and
RESULTS.md renders them with the ratio pefttutor / peft for each row.

    python benchmarks/bench.py                  # full run (`make bench`): benchmarks/results.json + RESULTS.md
    python benchmarks/bench.py --quick          # a smoke run in under 3 minutes (`make bench-quick`)
    python benchmarks/bench.py --render-only    # re-render RESULTS.md from results.json

This file is the entry point; the modules beside it, which the scripts here import by name:
kits.py (each model in both implementations), methods.py (what is compared: one entry of METHODS
or VARIANTS per method), harness.py (timing, peak memory, the machine), runs.py (the runs and their
records) and rendering.py (RESULTS.md, its prose in RESULTS.template.md).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from pefttutor import config as pt_config  # noqa: E402

from harness import log  # noqa: E402
from methods import METHODS, VARIANTS  # noqa: E402
from rendering import render  # noqa: E402
from runs import QUICK, Settings, run  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, as peft calls them

HERE = Path(__file__).resolve().parent


def _extras(out: Path) -> dict:
    """The results of benchmarks/speedups.py and time_to_accuracy.py, where they were run."""
    names = ("speedups", "time_to_accuracy")
    return {n: json.loads((out / f"{n}.json").read_text()) for n in names if (out / f"{n}.json").exists()}


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "RESULTS.md").write_text(render(result, _extras(out)))


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: pefttutor.config.get_device())")
    p.add_argument("--out", type=Path, default=HERE, help="folder for results.json and RESULTS.md")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats: a smoke run")
    p.add_argument("--weights", choices=["real", "random", "tiny"], default="real",
                   help="the real checkpoints, random weights of the same shapes, or tiny random models")
    p.add_argument("--repeats", type=int, help="timed runs per configuration (scaling points too)")
    p.add_argument("--warmup", type=int, help="untimed runs before them")
    p.add_argument("--models", nargs="+", choices=["smollm2", "minilm"])
    p.add_argument("--methods", nargs="+", choices=list(METHODS))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    p.add_argument("--sections", nargs="+", choices=["train", "latency", "scaling"])
    p.add_argument("--render-only", action="store_true", help="re-render RESULTS.md from OUT/results.json")
    a = p.parse_args(argv)
    if a.render_only:
        (a.out / "RESULTS.md").write_text(render(json.loads((a.out / "results.json").read_text()), _extras(a.out)))
        return None
    s = Settings(device=str(pt_config.get_device(a.device)), weights=a.weights, **(QUICK if a.quick else {}))
    for name in ("repeats", "warmup", "models", "methods", "variants", "sections"):
        value = getattr(a, name)
        if value is not None:
            setattr(s, name, tuple(value) if isinstance(value, list) else value)
    if a.repeats is not None:
        s.scaling_repeats = a.repeats
    pt_config.seed_everything(0)
    log(f"benchmarking on {s.device} with {torch.get_num_threads()} threads -> {a.out}")
    result = run(s)
    write(result, a.out)
    log(f"wrote {a.out / 'results.json'} and {a.out / 'RESULTS.md'} in {result['wall_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
