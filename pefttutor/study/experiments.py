"""The study's experiments, as configs: every run is one dict (task, method spec, learning rate,
seed, budget, autocast), and its id names the JSON file it writes under `results/`.

Per task and method, in this order:
* `sweep`: the learning-rate grid (MiniLM; C for the logistic regression), seed 0, 1 epoch, the
  protocol's validation schedule. The best validation metric picks the rate for the final runs;
  when it is at an edge of the grid, the runner first tries the next half-decade past that edge
  (up to twice per edge), so the chosen rate is never only the grid's end.
* `final`: the chosen rate (resolved by the runner from the sweep's results), full budget with
  early stopping, one run per seed.
* `fp32`: LoRA and full finetuning again without bf16 autocast (seed 0 and 1): the accuracy check
  for autocast as the study's default.
* `longer`: LoRA and full finetuning again with twice the cap (6 epochs; the cosine schedule
  stretched to it), seed 0: the plateau check for runs that stopped at the cap.
* `rank`: LoRA on Wq, Wv at other ranks, with alpha fixed at 16 (the scale alpha/r then runs from
  16 to 0.25, so rank is confounded with step size) and with alpha = 2r (the scale stays 2, as at
  r = 8), at LoRA's swept rate, seed 0.
SmolLM2 runs use the learning rates of the method notebooks (no sweep: a run costs 10-60 minutes
on a laptop CPU), seed 0 first; DoRA, QLoRA and LoRA on every block linear (QLoRA's 32-bit
counterpart) take LoRA's rate, IA3 its paper's 3e-3.
"""

from __future__ import annotations

from typing import Any

SEEDS = (0, 1, 2)
AUTOCAST = "bf16"  # the study's default; the `fp32` group measures what it changes
LONGER_EPOCHS = 6  # the `longer` group: twice the tweet task's cap of 3 epochs
BERT_ALL_LINEAR = ["query", "key", "value", "output.dense", "intermediate.dense"]
LLAMA_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (spec, learning-rate grid); in the order the study runs them (the headline comparison first)
TWEET_METHODS: dict[str, tuple[dict[str, Any], list[float]]] = {
    "full": ({"method": "full"}, [3e-5, 1e-4, 3e-4]),
    "lora-qv": ({"method": "lora", "targets": ["query", "value"], "r": 8, "alpha": 16}, [1e-3, 3e-3, 1e-2]),
    "head": ({"method": "head"}, [3e-3, 1e-2, 3e-2]),
    "features": ({"method": "features"}, [0.1, 1.0, 10.0]),  # the grid is the regularisation C
    "lora-all": ({"method": "lora", "targets": BERT_ALL_LINEAR, "r": 8, "alpha": 16}, [1e-3, 3e-3, 1e-2]),
    "houlsby": ({"method": "adapters", "size": 32, "placement": "houlsby"}, [1e-3, 3e-3, 1e-2]),
    "pfeiffer": ({"method": "adapters", "size": 32, "placement": "pfeiffer"}, [1e-3, 3e-3, 1e-2]),
    "parallel": ({"method": "adapters", "size": 32, "placement": "parallel"}, [1e-3, 3e-3, 1e-2]),
    "prefix-mlp": ({"method": "prefix_tuning", "n_tokens": 20, "reparam": True}, [1e-3, 3e-3, 1e-2]),
    "prefix": ({"method": "prefix_tuning", "n_tokens": 20, "reparam": False}, [1e-3, 3e-3, 1e-2]),
    "soft-prompt": ({"method": "prompt_tuning", "n_tokens": 20}, [1e-2, 3e-2, 1e-1]),
    "dora-qv": ({"method": "dora", "targets": ["query", "value"], "r": 8, "alpha": 16}, [1e-3, 3e-3, 1e-2]),
    # peft's IA3 layout for BERT: "output.dense" is both attention outputs and the feed-forward output
    "ia3": ({"method": "ia3", "targets": ["key", "value", "output.dense"], "feedforward": ["output.dense"]},
            [3e-3, 1e-2, 3e-2]),
}

# name -> (spec, learning rate from the method notebooks; where each came from: RESTAURANT_LR_SOURCE)
RESTAURANT_METHODS: dict[str, tuple[dict[str, Any], float]] = {
    "lora": ({"method": "lora", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 8, "alpha": 16}, 2e-3),
    "full": ({"method": "full"}, 5e-5),
    "llama-adapter": ({"method": "llama_adapter", "n_tokens": 10}, 1e-2),
    "houlsby": ({"method": "adapters", "size": 32, "placement": "houlsby"}, 2e-3),
    "prefix-mlp": ({"method": "prefix_tuning", "n_tokens": 20, "reparam": True}, 3e-3),
    "soft-prompt": ({"method": "prompt_tuning", "n_tokens": 20}, 3e-2),
    "dora": ({"method": "dora", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 8, "alpha": 16}, 2e-3),
    "ia3": ({"method": "ia3", "targets": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]}, 3e-3),
    # QLoRA against LoRA on the same layers (every block linear, the paper's setting) in 32 bits
    "lora-all": ({"method": "lora", "targets": LLAMA_ALL_LINEAR, "r": 8, "alpha": 16}, 2e-3),
    "qlora": ({"method": "qlora", "targets": LLAMA_ALL_LINEAR, "r": 8, "alpha": 16}, 2e-3),
}
RESTAURANT_LR_SOURCE = {
    "lora": "notebook 05 (SmolLM2 LoRA)", "full": "untuned, a common default for full finetuning",
    "llama-adapter": "notebook 04 (LLaMA-Adapter)", "houlsby": "untuned, LoRA's rate",
    "prefix-mlp": "notebook 03 (prefix with the MLP)", "soft-prompt": "notebook 03 (soft prompt)",
    "dora": "LoRA's", "ia3": "the IA3 paper's", "lora-all": "LoRA's", "qlora": "LoRA's",
}

# the `rank` group: name -> LoRA on Wq, Wv with that rank and alpha
RANK_SWEEP = {f"lora-qv-r{r}-alpha{alpha}": {**TWEET_METHODS["lora-qv"][0], "r": r, "alpha": alpha}
              for r in (1, 4, 16, 64) for alpha in (16, 2 * r)}

# name -> how tables and figures name the method
LABELS = {
    "full": "full finetuning", "head": "head only", "features": "frozen features + logistic regression",
    "untuned": "untuned (chat prompt)", "lora-qv": "LoRA r=8 on Wq, Wv", "lora": "LoRA r=8 on q, k, v, o",
    "lora-all": "LoRA r=8 on every linear layer", "dora-qv": "DoRA r=8 on Wq, Wv", "dora": "DoRA r=8 on q, k, v, o",
    "qlora": "QLoRA r=8 on every linear layer (NF4 base)", "ia3": "IA3",
    "houlsby": "Houlsby adapters m=32", "pfeiffer": "Pfeiffer adapters m=32", "parallel": "parallel adapters m=32",
    "llama-adapter": "LLaMA-Adapter, 10 tokens", "prefix-mlp": "prefix, 20 tokens, with the MLP",
    "prefix": "prefix, 20 tokens, without the MLP", "soft-prompt": "soft prompt, 20 tokens",
    **{name: f"LoRA r={spec['r']}, alpha={spec['alpha']} on Wq, Wv" for name, spec in RANK_SWEEP.items()},
}


UNTUNED = {"method": "untuned"}  # the instruct model prompted with its chat template: the baseline


def run_id(task: str, group: str, name: str, seed: int, lr: float | None = None) -> str:
    return f"{task}/{group}/{name}" + (f"_lr{lr:.0e}" if lr is not None else "") + f"_s{seed}"


def experiments(seeds: tuple[int, ...] = SEEDS) -> list[dict[str, Any]]:
    """Every experiment of the study, in run order. A final run's `lr` is `"sweep"`: the runner
    replaces it with the sweep's best before running (and records where it came from)."""
    out: list[dict[str, Any]] = []
    task = "minilm-tweets"
    first, rest = seeds[:1], seeds[1:]
    for stage_seeds in (first, rest):
        for name, (spec, grid) in TWEET_METHODS.items():
            if stage_seeds is first:
                out += [{"id": run_id(task, "sweep", name, 0, lr), "task": task, "group": "sweep", "name": name,
                         "spec": spec, "lr": lr, "seed": 0, "epochs": 1, "autocast": AUTOCAST} for lr in grid]
            if name == "features" and stage_seeds is rest:
                continue  # deterministic (lbfgs on fixed embeddings): one seed says it all
            out += [{"id": run_id(task, "final", name, s), "task": task, "group": "final", "name": name, "spec": spec,
                     "lr": "sweep", "seed": s, "epochs": None, "autocast": AUTOCAST} for s in stage_seeds]
    for name in ("full", "lora-qv"):
        out += [{"id": run_id(task, "fp32", name, s), "task": task, "group": "fp32", "name": name,
                 "spec": TWEET_METHODS[name][0], "lr": "sweep", "seed": s, "epochs": None, "autocast": None}
                for s in seeds[:2]]
    for name in ("full", "lora-qv"):
        out += [{"id": run_id(task, "longer", name, s), "task": task, "group": "longer", "name": name,
                 "spec": TWEET_METHODS[name][0], "lr": "sweep", "seed": s, "epochs": LONGER_EPOCHS,
                 "autocast": AUTOCAST} for s in seeds[:1]]
    out += [{"id": run_id(task, "rank", name, 0), "task": task, "group": "rank", "name": name, "spec": spec,
             "sweep": "lora-qv", "lr": "sweep", "seed": 0, "epochs": None, "autocast": AUTOCAST}
            for name, spec in RANK_SWEEP.items()]
    task = "smollm2-restaurants"
    out.append({"id": run_id(task, "final", "untuned", 0), "task": task, "group": "final", "name": "untuned",
                "spec": UNTUNED, "lr": 0.0, "seed": 0, "epochs": None, "autocast": None})
    for stage_seeds in (first, rest):
        for name, (spec, lr) in RESTAURANT_METHODS.items():
            out += [{"id": run_id(task, "final", name, s), "task": task, "group": "final", "name": name, "spec": spec,
                     "lr": lr, "seed": s, "epochs": None, "autocast": AUTOCAST} for s in stage_seeds]
    return out


def sweep_of(exp: dict[str, Any], all_experiments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sweep runs whose best learning rate a run uses: its method's, or the one its "sweep" names."""
    name = exp.get("sweep", exp["name"])
    return [e for e in all_experiments if e["task"] == exp["task"] and e["group"] == "sweep" and e["name"] == name]
