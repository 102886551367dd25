"""The training speed-ups, each measured against what it replaced, on the real models and the
study's real batches (`pefttutor.protocol`): median seconds per step (forward + backward + AdamW)
over the same batches, the two variants interleaved step by step after warm-up.

1. bf16 autocast (`train(autocast="bf16")`) vs fp32: MiniLM full finetuning and LoRA, batch 32.
2. AdamW's fused kernel (what `train` now picks) vs torch's default per-tensor loop: MiniLM full finetuning.
3. The LM head only at labelled positions (`causal_lm_loss` with `logits_at`) vs logits at every
   position: SmolLM2 LoRA, batch 8 of restaurant pairs.
4. Evaluation: the validation split sorted by length (`TweetTask`) vs in file order, fp32 and bf16.

    python benchmarks/speedups.py      # writes benchmarks/speedups.json; RESULTS.md shows it

The accuracy check of bf16 autocast is the study's `fp32` group (results/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bench  # noqa: E402  (benchmarks/bench.py)
from harness import machine  # noqa: E402
from pefttutor import checkpoint, config, data, protocol, train  # noqa: E402
from pefttutor.methods import lora  # noqa: E402

HERE = Path(__file__).resolve().parent


def all_positions_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """What causal_lm_loss did before: logits (B, T, vocab) at every position, -100s ignored."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


class Stepper:
    """One model + AdamW; `step(batch)` is a timed training step."""

    def __init__(self, model: nn.Module, loss, autocast: str | None, fused: bool, device: torch.device):
        self.model, self.loss, self.autocast, self.device = model.to(device).train(), loss, autocast, device
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5, **({"fused": True} if fused else {}))

    def step(self, batch: dict) -> float:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        t0 = time.perf_counter()
        with train.autocast_context(self.device, self.autocast):
            loss = self.loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


def compare(steppers: dict[str, Stepper], batches: list[dict], warmup: int) -> dict[str, float]:
    """Median step time of each variant, interleaved batch by batch (A B, then B A, ...)."""
    times: dict[str, list[float]] = {k: [] for k in steppers}
    names = list(steppers)
    for i, batch in enumerate(batches):
        for name in names if i % 2 == 0 else names[::-1]:
            t = steppers[name].step(batch)
            if i >= warmup:
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def eval_time(task: protocol.TweetTask, model: nn.Module, batches, autocast: str | None, repeats: int) -> float:
    def once():
        t0 = time.perf_counter()
        with train.autocast_context(task.device, autocast):
            train.predict_classes(model, batches, device=task.device)
        return time.perf_counter() - t0
    once()
    return statistics.median(once() for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="timed steps per comparison (after 2 warm-up)")
    parser.add_argument("--out", type=Path, default=HERE / "speedups.json")
    parser.add_argument("--device", help="cpu or cuda (default: CUDA when present)")
    args = parser.parse_args(argv)
    device = config.get_device(args.device)
    n = args.steps + 2
    rows = []
    tweets = protocol.TweetTask(device)
    batches = tweets.train_batches(0)(0)[:n]
    qv = lambda m: lora.apply(m, ("query", "value"), r=8, alpha=16, train=("classifier",))  # noqa: E731
    # bf16 rows only where the device has native bf16 kernels (elsewhere bf16 is emulated, tens of times slower)
    native = train.native_bf16(device)
    autocasts, fast = ((None, "bf16"), "bf16") if native else ((None,), None)
    models = {"MiniLM full finetuning": lambda: tweets.new_model(0),
              "MiniLM LoRA r=8 Wq,Wv": lambda: qv(tweets.new_model(0))}
    for label, make in models.items() if native else ():
        t = compare({"fp32": Stepper(make(), tweets.loss, None, True, device),
                     "bf16": Stepper(make(), tweets.loss, "bf16", True, device)}, batches, 2)
        rows.append({"speed-up": "bf16 autocast", "setting": f"{label}, batch 32", "before": t["fp32"],
                     "after": t["bf16"]})
        print(rows[-1], flush=True)
    t = compare({"loop": Stepper(tweets.new_model(0), tweets.loss, fast, False, device),
                 "fused": Stepper(tweets.new_model(0), tweets.loss, fast, True, device)}, batches, 2)
    rows.append({"speed-up": "fused AdamW", "setting": f"MiniLM full finetuning, batch 32, {fast or 'fp32'}",
                 "before": t["loop"], "after": t["fused"]})
    print(rows[-1], flush=True)
    model = tweets.new_model(0).eval()
    val = tweets.splits["validation"]
    in_order = data.classification_batches(val, tweets.tokenizer, tweets.eval_batch_size, tweets.max_length)
    _, by_length = tweets._eval_batches["validation"]
    for autocast in autocasts:
        before, after = (eval_time(tweets, model, b, autocast, 3) for b in (in_order, by_length))
        rows.append({"speed-up": "validation sorted by length", "setting": f"MiniLM, {len(val)} tweets, batch "
                     f"{tweets.eval_batch_size}, {autocast or 'fp32'}", "before": before, "after": after})
        print(rows[-1], flush=True)
    if native:
        rows.append({"speed-up": "validation sorted by length, bf16", "setting": "vs in file order, fp32",
                     "before": rows[-2]["before"], "after": rows[-1]["after"]})
    del tweets, model
    lm = protocol.RestaurantTask(device)
    lm_batches = lm.train_batches(0)(0)[:n]
    lora_lm = lambda: lora.apply(lm.new_model(0), ("q_proj", "k_proj", "v_proj", "o_proj"), r=8, alpha=16)  # noqa: E731
    for autocast in autocasts:
        t = compare({"all": Stepper(lora_lm(), all_positions_lm_loss, autocast, True, device),
                     "labelled": Stepper(lora_lm(), train.causal_lm_loss, autocast, True, device)}, lm_batches, 2)
        rows.append({"speed-up": "LM head at labelled positions only", "setting": f"SmolLM2 LoRA q,k,v,o r=8, batch 8,"
                     f" {autocast or 'fp32'}", "before": t["all"], "after": t["labelled"]})
        print(rows[-1], flush=True)
    result = {"machine": machine(device), "steps": args.steps, "native_bf16": native, "rows": rows}
    checkpoint.write_atomic(args.out, json.dumps(result, indent=1).encode())
    print(f"wrote {args.out}")
    if args.out.parent == HERE and (HERE / "results.json").exists():
        bench.main(["--render-only"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
