"""What each process of `tests/test_distributed.py`'s torchrun launch runs (and, with --single, the
one-process reference): every case trains a tiny model on the same global batches and rank 0
writes its loss curve and final trainable weights to OUT/<case>.safetensors."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_bert, tiny_llama  # noqa: E402

from pefttutor import distributed, train  # noqa: E402
from pefttutor.methods import lora, prompt_tuning  # noqa: E402
from pefttutor.models import BertClassifier  # noqa: E402

BATCH, STEPS = 8, 6


def batches(family: str) -> list[dict[str, torch.Tensor]]:
    """Two global batches of BATCH rows; no padding in the LM's, so every row scores the same tokens
    (the processes' mean losses then average to the batch's mean loss)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2 * BATCH, 12), generator=g)
    mask = torch.ones_like(ids)
    if family == "bert":
        mask[::3, 8:] = 0  # padding: a classifier's loss is a mean over rows, whatever their lengths
        extra = {"labels": torch.randint(0, 3, (2 * BATCH,), generator=g)}
    else:
        extra = {"labels": ids.clone()}
    data = {"input_ids": ids, "attention_mask": mask, **extra}
    return [{k: v[i:i + BATCH] for k, v in data.items()} for i in (0, BATCH)]


def model_for(family: str, method: str) -> nn.Module:
    if family == "bert":
        model = BertClassifier(tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), 3, dropout=0.0)
        targets, train_ = ("query", "value"), ("classifier",)
        model.bert.pooler.requires_grad_(False)  # mean pooling never uses it: DDP would wait for its gradient
    else:
        model, targets, train_ = tiny_llama(), ("q_proj", "v_proj"), ()
    torch.manual_seed(1)
    if method == "lora":
        lora.apply(model, targets, r=4, alpha=8, train=train_)
    if method == "prompt_tuning":  # a parameter read directly, not through a module's forward
        prompt_tuning.apply(model, n_tokens=3, train=train_)
    return model


CASES = [(f, m, s) for f in ("bert", "llama") for m in ("full", "lora", "prompt_tuning") for s in ("ddp", "fsdp")]


def run(family: str, method: str, how: str | None, out: Path) -> None:
    model = model_for(family, method)
    loss = train.classification_loss if family == "bert" else train.causal_lm_loss
    r = train.train(model, batches(family), loss, steps=STEPS, lr=1e-2, warmup=2, clip=1.0, device="cpu",
                    progress=False, distributed=how)
    held = distributed.local_bytes(model) if how else None
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state = distributed.full_state_dict({n: p.detach() for n, p in model.named_parameters() if n in names})
    if how is None or torch.distributed.get_rank() == 0:
        meta = {"loss_curve": json.dumps(r.loss_curve), "allreduce": json.dumps(r.allreduce_bytes_per_step),
                "local_bytes": json.dumps(held), "total_bytes": json.dumps(4 * r.total_params)}
        save_file({k: v.contiguous() for k, v in state.items()}, out / f"{family}-{method}-{how or 'single'}.safetensors", meta)


def unused(out: Path) -> None:
    """A trainable parameter outside the forward pass: DDP's classic failure, then ours, then the fix."""
    rank = torch.distributed.get_rank()
    report = {}
    model = model_for("bert", "lora")
    model.spare = nn.Linear(4, 4)  # trainable, never used
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    try:
        for batch in batches("bert") * 2:
            train.classification_loss(ddp, distributed.shard(batch, rank, 2)).backward()
            opt.step()
    except RuntimeError as error:
        report["ddp"] = str(error)
    model = model_for("bert", "lora")
    model.spare = nn.Linear(4, 4)
    try:
        train.train(model, batches("bert"), train.classification_loss, steps=2, device="cpu", progress=False,
                    distributed="ddp")
    except ValueError as error:
        report["ours"] = str(error)
    r = train.train(model, batches("bert"), train.classification_loss, steps=2, device="cpu", progress=False,
                    distributed=distributed.Strategy("ddp", find_unused_parameters=True))
    report["fixed_steps"] = r.steps
    if rank == 0:
        (out / "unused.json").write_text(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--single", action="store_true", help="the one-process reference runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.single:
        for family, method in {(f, m) for f, m, _ in CASES}:
            run(family, method, None, args.out)
        return
    for family, method, how in CASES:
        run(family, method, how, args.out)
    unused(args.out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
