"""QLoRA's 4-bit base measured on SmolLM2-135M's real weights (every linear layer of its 30 blocks:
q, k, v, o, gate, up, down, 210 matrices), blocks of 64:

1. quantization error of NF4, FP4 and int4 absmax (15 levels k/7), each with and without double
   quantization: RMS and mean of |W_hat - W| over all those weights, divided by the weights' RMS;
2. storage: bits per parameter from the bytes the 4-bit layers hold (codes and constants; the
   paper: 4.127 with double quantization), the whole model's bytes (every tensor once: the tied
   LM head and the embeddings stay fp32) against fp32's, and the size of its `quantized.save` file;
3. the validation loss of the whole 4-bit model in each format (double quantized, as QLoRA),
   next to fp32's: the protocol's `RestaurantTask.validation_loss` (mean target-token
   cross-entropy of its 100 validation pairs, batches of 16), with its time;
4. one training step (batch 8 of restaurant pairs, forward + backward + AdamW, the protocol's LoRA:
   q, k, v, o, r = 8, alpha = 16, lr 2e-3): LoRA on the fp32 model vs QLoRA on the NF4 + double
   quantized one (every block linear in 4 bits), median seconds of a few steps, interleaved.

    OMP_NUM_THREADS=1 python benchmarks/quantization.py     # writes benchmarks/quantization.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from harness import machine  # noqa: E402  (benchmarks/harness.py)
from pefttutor import calculator, checkpoint, params, protocol, quant, quantized, train  # noqa: E402
from pefttutor.methods import lora, qlora  # noqa: E402

HERE = Path(__file__).resolve().parent
FORMATS = {f"{t}{'+dq' if dq else ''}": (t, dq) for t in ("nf4", "fp4", "int4") for dq in (False, True)}
LOSS_FORMATS = ("nf4+dq", "fp4+dq", "int4+dq")
LORA = {"targets": ("q_proj", "k_proj", "v_proj", "o_proj"), "r": 8, "alpha": 16}  # the protocol's LoRA
LR = 2e-3


def weight_errors(model: nn.Module, quantized_models: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
    """Per format: RMS and mean |W_hat - W| over every weight of the 4-bit layers, / RMS of W."""
    W = {p: m.weight.detach() for p, m in params.find_modules(model, quantized.DECODER).items()}
    n = sum(w.numel() for w in W.values())
    rms = math.sqrt(sum(float(w.double().pow(2).sum()) for w in W.values()) / n)
    out = {}
    for name, q in quantized_models.items():
        se = ae = 0.0
        for p, layer in quantized.layers(q).items():
            E = layer.dequantized().double() - W[p].double()
            se, ae = se + float(E.pow(2).sum()), ae + float(E.abs().sum())
        out[name] = {"rms_error_rel": math.sqrt(se / n) / rms, "mean_abs_error_rel": ae / n / rms}
    return {"weights": n, "weight_rms": rms, "formats": out}


def model_bytes(model: nn.Module) -> int:
    """Bytes of every tensor of the state_dict, each once (a tied LM head counts once)."""
    return sum(t.numel() * t.element_size() for t in quantized._unique(model.state_dict()).values())


def storage(fp32: nn.Module, q: nn.Module) -> dict[str, float]:
    layers = quantized.layers(q).values()
    n = sum(m.in_features * m.out_features for m in layers)
    four_bit = sum(m.stored_bytes() for m in layers)
    with tempfile.TemporaryDirectory() as tmp:
        quantized.save(q, Path(tmp) / "base.safetensors")
        file_bytes = (Path(tmp) / "base.safetensors").stat().st_size
    return {"bits_per_parameter": 8 * four_bit / n, "linear_bytes_4bit": four_bit, "linear_bytes_fp32": 4 * n,
            "model_bytes": model_bytes(q), "model_bytes_fp32": model_bytes(fp32), "file_bytes": file_bytes}


def timed_loss(loss, model: nn.Module) -> tuple[float, float]:
    t0 = time.perf_counter()
    value = loss(model)
    return value, time.perf_counter() - t0


def step_times(models: dict[str, nn.Module], batches: list[dict], loss, warmup: int = 1) -> dict[str, float]:
    """Median seconds per training step (forward, backward, AdamW) of each model, interleaved
    batch by batch (A B, then B A, ...) so that a slower moment of a shared CPU hits both."""
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR)
                  for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for i, batch in enumerate(batches):
        for name in names if i % 2 == 0 else names[::-1]:
            model, optimizer = models[name].train(), optimizers[name]
            t0 = time.perf_counter()
            loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def provenance() -> dict[str, str | int]:
    """The machine (`harness.machine`) and the git commit the numbers come from (dirty: uncommitted changes)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()

    return {**machine(torch.device("cpu")), "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="training steps per model, the first one warm-up")
    parser.add_argument("--out", type=Path, default=HERE / "quantization.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    task = protocol.RestaurantTask("cpu")
    fp32 = task.base.eval()
    models = {name: quantized.quantize_model(copy.deepcopy(fp32), quantized.DECODER, t, dq)
              for name, (t, dq) in FORMATS.items()}
    result = {"machine": provenance(), "model": "SmolLM2-135M-Instruct", "block": quant.BLOCK,
              "int4": "symmetric absmax, 15 levels k/7 for k = -7..7",
              "errors": weight_errors(fp32, models), "storage": {},
              "paper_bits_per_parameter": {"dq": round(calculator.bits_per_parameter(True), 3), "no_dq": 4.5}}
    print(json.dumps(result["errors"], indent=1), flush=True)
    for name in ("nf4", "nf4+dq"):
        result["storage"][name] = storage(fp32, models[name])
        print(name, result["storage"][name], flush=True)
    loss, t = timed_loss(task.validation_loss, fp32)
    result["validation_loss"] = {"fp32": {"loss": loss, "seconds": t}}
    print("fp32", loss, flush=True)
    for name in LOSS_FORMATS:
        loss, t = timed_loss(task.validation_loss, models[name])
        result["validation_loss"][name] = {"loss": loss, "seconds": t}
        print(name, loss, f"{t:.0f} s", flush=True)
    n_val = sum(int((b["labels"][:, 1:] != -100).any(1).sum()) for b in task._val_loss_batches)
    result["validation_loss"]["examples"] = n_val
    base4 = models["nf4+dq"]
    for name in FORMATS:
        if name != "nf4+dq":
            del models[name]
    batches = task.train_batches(0)(0)[:args.steps]
    steppers = {"lora": lora.apply(copy.deepcopy(fp32), **LORA), "qlora": qlora.apply(base4, **LORA)}
    result["step_seconds"] = {**step_times(steppers, batches, train.causal_lm_loss),
                              "batch": task.batch_size, "steps_timed": max(len(batches) - 1, 0),
                              "settings": {**LORA, "lr": LR, "qlora_base": "every block linear NF4 + double quant"}}
    print(result["step_seconds"], flush=True)
    result["wall_time_s"] = time.perf_counter() - start
    checkpoint.write_atomic(args.out, json.dumps(result, indent=1).encode())
    print(f"wrote {args.out} in {result['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
