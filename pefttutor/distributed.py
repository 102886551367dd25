"""Training across processes on PyTorch's own engines: DDP and FSDP2, for `pefttutor.train`.

`train(..., distributed="ddp")` (or `"fsdp"`) in a script started by torchrun runs the same loop
in every process: each takes its rows of every global batch (`shard`), and the gradients are
averaged across processes before the update, so every process takes the step one process would
take with the whole batch (tested: same loss curve and weights, `tests/test_distributed.py`).

    torchrun --standalone --nproc_per_node 2 -m pefttutor.distributed --method lora --steps 60

- DDP (`DistributedDataParallel`) keeps a whole model per process and all-reduces the gradients
  of the *trainable* parameters only: LoRA on MiniLM sends 75 thousand numbers per step where full
  finetuning sends 22.7 million (measured: `python -m pefttutor.distributed --measure`).
- FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps 1/world of every parameter per process and
  gathers a unit's weights just before it runs. As peft's FSDP guide recommends, every trainable
  linear layer (LoRA's A and B, an adapter's projections, the head) is its own unit, apart from the
  frozen weights around it; then every transformer layer, then the root.
  `full_state_dict` gathers an adapter's shards into whole tensors, to save as usual.

gloo on CPU, NCCL on CUDA. A trainable parameter that gets no gradient (an unused head) makes DDP
fail at the *next* step with "Expected to have finished reduction in the prior iteration ...";
`train` checks after the first backward and names the parameters instead (fix: freeze them, or
`Strategy("ddp", find_unused_parameters=True)`, which costs a graph traversal every step).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

KINDS = ("ddp", "fsdp")


@dataclass(frozen=True)
class Strategy:
    """How `train` spreads over processes: "ddp" or "fsdp" (FSDP2), and DDP's one switch that matters here."""

    kind: str
    find_unused_parameters: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"distributed must be one of {KINDS} (or a Strategy), got {self.kind!r}")
        if self.find_unused_parameters and self.kind != "ddp":
            raise ValueError("find_unused_parameters is DDP's setting; FSDP2 needs no such switch")


def strategy(value: Strategy | str) -> Strategy:
    return value if isinstance(value, Strategy) else Strategy(value)


def init(device: torch.device) -> tuple[int, int]:
    """(rank, world size): the default process group, started from torchrun's environment if needed."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise RuntimeError("distributed training needs a process group: start the script with torchrun, e.g. "
                               "`torchrun --standalone --nproc_per_node 2 script.py`")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This process's rows of a global batch: rows [rank * B/world, (rank + 1) * B/world)."""
    sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v)}
    (rows,) = sizes  # every tensor of a batch has the same rows
    if rows % world:
        raise ValueError(f"a batch of {rows} rows does not split evenly over {world} processes: the average of the "
                         "processes' mean losses would then not be the batch's mean loss")
    n = rows // world
    return {k: v[rank * n:(rank + 1) * n] if torch.is_tensor(v) else v for k, v in batch.items()}


def mean(value: torch.Tensor) -> torch.Tensor:
    """The average of `value` over the processes (every process gets it)."""
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def wrap(model: nn.Module, how: Strategy, device: torch.device) -> nn.Module:
    """The module `train` runs forward and backward through: a DDP wrapper, or `model` itself sharded in place."""
    if how.kind == "ddp":
        ids = [device] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=how.find_unused_parameters)
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns for every Linear on 3-d inputs (F.linear returns a view) in case the caller adds to
    # the output in place; our models and methods never do (tested: the same weights as one process)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for unit in fsdp_units(model):
        fully_shard(unit)
    fully_shard(model)
    return model


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards on their own, innermost first: each trainable `nn.Linear` (peft's
    `fsdp_auto_wrap_policy`: LoRA's A and B, an adapter's projections, a head), then each transformer
    layer (the members of a ModuleList). A unit's weights are gathered when its forward runs, so a
    parameter read directly (a soft prompt, IA3's vector, a gate) stays in its layer's or the root's unit."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    layers = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    return linears + [m for m in layers if all(m is not t for t in linears)]


def unused_trainable(model: nn.Module) -> list[str]:
    """Trainable parameters left without a gradient by a backward pass."""
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of one of FSDP2's sharded ones (a collective: every process must call it); others as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors from FSDP2's shards, e.g. of `method.adapter_state_dict(model)`, to save as usual."""
    return {k: whole(v) for k, v in tensors.items()}


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters this process holds between steps: all of them under DDP, its shards under FSDP2."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()  # a forward without backward (evaluation) leaves the root's weights gathered
    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


class AllReduceCounter:
    """Counts the gradient bytes a DDP model all-reduces (a DDP communication hook around the default one)."""

    def __init__(self, ddp_model: nn.parallel.DistributedDataParallel):
        self.bytes = 0
        ddp_model.register_comm_hook(None, self._hook)

    def _hook(self, _, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.bytes += bucket.buffer().nbytes
        return default_hooks.allreduce_hook(None, bucket)


# --- `python -m pefttutor.distributed` (under torchrun): MiniLM on the tweets, the study's settings

SPECS = {"full": "full", "lora": "lora-qv", "prompt_tuning": "soft-prompt"}  # -> the study's experiment names
RATES = {"full": 3e-4, "lora": 3e-3, "prompt_tuning": 3e-2}  # the study's swept rates (results/README.md)


def _train_minilm(method: str, how: str, steps: int, device: torch.device) -> dict:
    from . import protocol, train
    from .study import experiments, methods

    task = protocol.TweetTask(device)
    model = methods.build(task.new_model(0), experiments.TWEET_METHODS[SPECS[method]][0])
    if method == "full":
        model.bert.pooler.requires_grad_(False)  # mean pooling never uses it: DDP would wait for its gradient
    r = train.train(model, task.train_batches(0), task.loss, steps=steps, lr=RATES[method], warmup=0.1,
                    device=device, progress=False, autocast="auto", distributed=how)
    accuracy = task.evaluate(model, "validation")["accuracy"]
    return {"method": method, "strategy": how, "processes": dist.get_world_size(), "steps": r.steps,
            "global_batch": task.batch_size, "trainable_params": r.trainable_params,
            "allreduce_bytes_per_step": r.allreduce_bytes_per_step, "median_step_s": r.median_step_s,
            "param_bytes_per_process": local_bytes(model), "first_loss": r.loss_curve[0], "last_loss": r.loss_curve[-1],
            "validation_accuracy": accuracy}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from . import config
    from .study.runner import provenance

    parser = argparse.ArgumentParser(prog="torchrun --standalone --nproc_per_node 2 -m pefttutor.distributed",
                                     description="Train MiniLM on the tweets across processes.")
    parser.add_argument("--method", choices=sorted(SPECS), default="lora")
    parser.add_argument("--strategy", choices=KINDS, default="ddp")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--measure", type=Path, help="run every method under both strategies for --steps steps "
                        "and write the measurements to this JSON file")
    args = parser.parse_args(argv)
    device = config.get_device()
    init(device)
    runs = [(m, s) for m in SPECS for s in KINDS] if args.measure else [(args.method, args.strategy)]
    results = [_train_minilm(m, s, args.steps, device) for m, s in runs]
    if dist.get_rank() == 0:
        for r in results:
            sent = r["allreduce_bytes_per_step"]
            print(f"{r['method']:>13s} {r['strategy']}: {r['trainable_params']:>10,} trainable, "
                  + (f"{sent / 2**20:8.2f} MiB all-reduced per step, " if sent is not None else "")
                  + f"{r['param_bytes_per_process'] / 2**20:6.1f} MiB of parameters per process, "
                  f"step {1000 * r['median_step_s']:.0f} ms, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, "
                  f"validation accuracy {r['validation_accuracy']:.3f}")
        if args.measure:
            from . import checkpoint

            text = json.dumps({"runs": results, "provenance": provenance(device)}, indent=1) + "\n"
            checkpoint.write_atomic(args.measure, text.encode())
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
