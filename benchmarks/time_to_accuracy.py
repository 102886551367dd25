"""Time to accuracy: pefttutor's LoRA loop against what a user would pick instead,
`transformers.Trainer` + `peft` LoRA, on the same task, in one run.

Everything the comparison fixes is shared: MiniLM tweets (the study's protocol: all 6,000 training
tweets, the whole validation split, test on all 2,100), LoRA r=8, alpha=16 on query/value plus the
trained linear head on mean-pooled states, learning rate 3e-3, batch 32, 3 epochs, 12 validation
passes (every quarter epoch), seed 0. Each contestant is timed from its first training step; the
clock includes its validation passes. Reported: wall time until validation accuracy first reaches
the target (the converged full-finetuning validation accuracy of `results/` minus 1 point), total
time, median step time and test accuracy at the end.

    python benchmarks/time_to_accuracy.py          # writes benchmarks/time_to_accuracy.json; RESULTS.md shows it
    python benchmarks/time_to_accuracy.py --quick  # a smoke run on shrunk data (fast mode)

Contestants: Trainer with its defaults (random sampling, fp32, eval batch 8, AdamW fused, linear
decay without warmup); Trainer with its best flags for this machine (`train_sampling_strategy=
"group_by_length"`, `bf16=True` where the device has native bf16 kernels, eval batch 128); pefttutor's
`train` as the study runs it (length-grouped batches, bf16 autocast where native, validation sorted by length).
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

from torch import nn  # noqa: E402

import bench  # noqa: E402  (benchmarks/bench.py)
from harness import machine  # noqa: E402
from kits import HFBertClassifier  # noqa: E402
from pefttutor import checkpoint, config, data, metrics, protocol, train  # noqa: E402
from pefttutor.methods import lora  # noqa: E402

HERE = Path(__file__).resolve().parent
R, ALPHA, TARGETS, LR, EPOCHS, EVALS_PER_EPOCH, SEED = 8, 16, ("query", "value"), 3e-3, 3, 4, 0


def target_accuracy(results: Path) -> tuple[float, list[str]]:
    """Converged full finetuning's best validation accuracy (mean over the study's seeds) - 1 point."""
    files = sorted((results / "minilm-tweets" / "final").glob("full_s*.json"))
    if not files:
        raise SystemExit(f"no full-finetuning results under {results}: run `make study` first, or pass --target")
    accs = [json.loads(f.read_text())["best"]["validation"]["accuracy"] for f in files]
    return statistics.fmean(accs) - 0.01, [f.name for f in files]


def ours(task: protocol.TweetTask, every: int, steps: int) -> dict:
    model = lora.apply(task.new_model(SEED), TARGETS, r=R, alpha=ALPHA, train=("classifier",))
    curve, t0 = [], []

    def validate(m):
        with train.autocast_context(task.device, train.resolve_autocast(task.device, "auto")):
            acc = task.validate(m)["accuracy"]
        curve.append((time.perf_counter() - t0[0], acc))
        return {"accuracy": acc}

    def batches(epoch):  # start the clock at the first batch, as Trainer's callback does
        if not t0:
            t0.append(time.perf_counter())
        return task.train_batches(SEED)(epoch)

    r = train.train(model, batches, task.loss, steps=steps, lr=LR, warmup=0.06, evaluate=validate, eval_every=every,
                    seed=SEED, device=task.device, progress=False, autocast="auto")
    wall = time.perf_counter() - t0[0]
    return {"curve": curve, "wall_s": wall, "median_step_s": r.median_step_s,
            "test_accuracy": task.evaluate(model, "test")["accuracy"]}


class _Loss(nn.Module):
    """What Trainer expects: forward(..., labels) -> {"loss", "logits"}."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids, attention_mask, labels=None):
        logits = self.classifier(input_ids, attention_mask)
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return {"loss": loss, "logits": logits}


def trainer(task: protocol.TweetTask, every: int, best_flags: bool, out_dir: Path) -> dict:
    import peft
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from pefttutor.models import load_minilm_hf

    hf = load_minilm_hf(device=task.device)
    bert = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS)))
    config.seed_everything(SEED)
    model = _Loss(HFBertClassifier(bert, len(data.LABELS), dropout=hf.config.hidden_dropout_prob))

    def encode(examples):
        enc = task.tokenizer([ex["text"] for ex in examples], truncation=True, max_length=task.max_length)
        return [{"input_ids": i, "attention_mask": a, "labels": ex["label"]}
                for i, a, ex in zip(enc["input_ids"], enc["attention_mask"], examples)]

    curve, t0 = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            t0.append(time.perf_counter())

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            curve.append((time.perf_counter() - t0[0], metrics["eval_accuracy"]))

    def accuracy(pred):
        return {"accuracy": metrics.accuracy(pred.predictions.argmax(-1).tolist(), pred.label_ids.tolist())}

    flags = {}
    if best_flags:
        # bf16 only on native kernels: elsewhere (AVX2-only CPUs) PyTorch's bf16 gemm is tens of times slower
        flags = {"train_sampling_strategy": "group_by_length", "bf16": train.native_bf16(task.device),
                 "per_device_eval_batch_size": 128}
    args = TrainingArguments(
        output_dir=str(out_dir), num_train_epochs=EPOCHS, per_device_train_batch_size=task.batch_size,
        learning_rate=LR, eval_strategy="steps", eval_steps=every, save_strategy="no", logging_strategy="no",
        report_to="none", seed=SEED, disable_tqdm=True, label_names=["labels"], use_cpu=task.device.type == "cpu",
        **flags)
    t = Trainer(model=model, args=args, train_dataset=encode(task.train_set),
                eval_dataset=encode(task.splits["validation"]), data_collator=DataCollatorWithPadding(task.tokenizer),
                compute_metrics=accuracy, callbacks=[Clock()])
    t.train()
    wall = time.perf_counter() - t0[0]
    steps = t.state.global_step
    test = t.predict(encode(task.splits["test"]))
    return {"curve": curve, "wall_s": wall, "median_step_s": None, "mean_step_s_incl_eval": wall / steps,
            "test_accuracy": float(test.metrics["test_accuracy"]), "flags": flags}


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fast mode: shrunk data, a smoke run")
    parser.add_argument("--target", type=float, help="validation accuracy to reach (default: from results/)")
    parser.add_argument("--out", type=Path, default=HERE / "time_to_accuracy.json")
    parser.add_argument("--device", help="cpu or cuda (default: CUDA when present)")
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["PEFTTUTOR_FAST"] = "1"
    device = config.get_device(args.device)
    task = protocol.TweetTask(device)
    every = max(1, task.steps_per_epoch // EVALS_PER_EPOCH)
    steps = EPOCHS * task.steps_per_epoch
    if args.target is not None:
        target, source = args.target, ["--target"]
    else:
        target, source = target_accuracy(config.repo_root() / "results")
    runs = {}
    for name, fn in (("Trainer + peft, defaults", lambda: trainer(task, every, False, HERE / ".trainer")),
                     ("Trainer + peft, best flags", lambda: trainer(task, every, True, HERE / ".trainer")),
                     ("pefttutor", lambda: ours(task, every, steps))):
        print(f"{name} ...", flush=True)
        runs[name] = fn()
        runs[name]["time_to_target_s"] = time_to(runs[name]["curve"], target)
        print(f"    {runs[name]['wall_s']:.0f} s, time to {target:.4f}: {runs[name]['time_to_target_s']}, "
              f"test {runs[name]['test_accuracy']:.4f}", flush=True)
    result = {"target": target, "target_from": source, "settings": {
        "r": R, "alpha": ALPHA, "targets": TARGETS, "lr": LR, "epochs": EPOCHS, "batch": task.batch_size,
        "eval_every": every, "steps": steps, "train": len(task.train_set), "validation": len(task.splits["validation"]),
        "mode": "fast" if config.is_fast() else "full"}, "machine": machine(device), "runs": runs}
    checkpoint.write_atomic(args.out, json.dumps(result, indent=1).encode())
    print(f"wrote {args.out}")
    if args.out.parent == HERE and (HERE / "results.json").exists():
        bench.main(["--render-only"])  # RESULTS.md shows the table
    return 0


if __name__ == "__main__":
    sys.exit(main())
