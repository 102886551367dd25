"""Serving several LoRA adapters at once: a mixed batch (every row its own adapter, one pass through
W0; `pefttutor.multi`) against one adapter at a time (set_adapter, then that adapter's rows),
on SmolLM2-135M with 4 LoRA adapters (q, k, v, o; r = 8) and a batch of 8 prompts, 2 per adapter.

Each contestant greedily generates `--new-tokens` tokens for the whole batch (KV cache), and, as
"prefill", scores the prompts once; medians of interleaved rounds (`harness.interleaved`). Before
timing, the mixed batch's tokens are checked against the swapped run's, row for row. Also measured:
the batch with one adapter for every row (no gather) and the base model alone (no adapter), the
bounds a mixed batch sits between.

    OMP_NUM_THREADS=1 python benchmarks/multi_adapter.py       # writes benchmarks/multi_adapter.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from harness import interleaved  # noqa: E402  (benchmarks/harness.py)
from pefttutor import checkpoint, data  # noqa: E402
from pefttutor.methods import lora  # noqa: E402
from pefttutor.multi import MultiAdapter  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
NO_EOS = -1  # no token has it: every run generates the same number of tokens


def serving(base: nn.Module, n_adapters: int, r: int, folder: Path) -> MultiAdapter:
    """`base` with `n_adapters` random LoRA adapters (B ~ N(0, 0.02^2): each changes the outputs), named a0, a1, ..."""
    for i in range(n_adapters):
        torch.manual_seed(i)
        lora.apply(base, TARGETS, r=r, alpha=2 * r)
        with torch.no_grad():
            for name, p in lora.trainable(base).items():
                if ".lora_B." in name:
                    p.normal_(0, 0.02)
        lora.save(base, folder / f"a{i}.safetensors")
        lora.remove(base)
    multi = MultiAdapter(base)
    for i in range(n_adapters):
        multi.load_adapter(folder / f"a{i}.safetensors", f"a{i}")
    return multi


def _group(ids: torch.Tensor, mask: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Those rows, without the left columns that are padding in all of them."""
    ids, mask = ids[rows], mask[rows]
    first = int(mask.any(0).nonzero()[0])
    return ids[:, first:], mask[:, first:]


def measure(base: nn.Module, ids: torch.Tensor, mask: torch.Tensor, n_adapters: int = 4, r: int = 8,
            new_tokens: int = 32, repeats: int = 5) -> list[dict]:
    """Timing rows for a left-padded batch `ids`/`mask`, its rows dealt to the adapters in turn."""
    with tempfile.TemporaryDirectory() as folder:
        multi = serving(base, n_adapters, r, Path(folder))
    names = [f"a{i % n_adapters}" for i in range(len(ids))]
    groups = {a: [i for i, n in enumerate(names) if n == a] for a in dict.fromkeys(names)}
    parts = {a: _group(ids, mask, rows) for a, rows in groups.items()}
    kwargs = dict(eos_token_id=NO_EOS)

    def mixed_generate():
        return multi.generate(ids, new_tokens, attention_mask=mask, adapter_names=names, **kwargs)

    def swapped_generate():  # each adapter's rows on their own, the adapter switched in for them
        out = {}
        for a, (i, m) in parts.items():
            multi.set_adapter(a)
            out[a] = multi.generate(i, new_tokens, attention_mask=m, **kwargs)[:, -new_tokens:]
        multi.set_adapter(None)
        return out

    def one_adapter_generate():
        multi.set_adapter(names[0])
        out = multi.generate(ids, new_tokens, attention_mask=mask, **kwargs)
        multi.set_adapter(None)
        return out

    def mixed_prefill():
        return multi(ids, mask, adapter_names=names)

    def swapped_prefill():
        for a, (i, m) in parts.items():
            multi.set_adapter(a)
            multi(i, m)
        multi.set_adapter(None)

    def one_adapter_prefill():
        multi.set_adapter(names[0])
        multi(ids, mask)
        multi.set_adapter(None)

    with torch.no_grad():
        mixed, swapped = mixed_generate()[:, -new_tokens:], swapped_generate()
        for a, rows in groups.items():  # the two contestants must do the same work
            if not torch.equal(mixed[rows], swapped[a]):
                raise AssertionError(f"the mixed batch's tokens differ from adapter {a}'s alone")
        contestants = {
            "generate": {"mixed batch": mixed_generate, "swap per group": swapped_generate,
                         "one adapter, whole batch": one_adapter_generate,
                         "base model": lambda: multi.generate(ids, new_tokens, attention_mask=mask, **kwargs)},
            "prefill": {"mixed batch": mixed_prefill, "swap per group": swapped_prefill,
                        "one adapter, whole batch": one_adapter_prefill, "base model": lambda: multi(ids, mask)},
        }
        rows = []
        for phase, fns in contestants.items():
            times = interleaved(fns, repeats=repeats, warmup=1, device=ids.device)
            tokens = len(ids) * new_tokens if phase == "generate" else int(mask.sum())
            swap = statistics.median(times["swap per group"])
            for name, ts in times.items():
                t = statistics.median(ts)
                rows.append({"phase": phase, "contestant": name, "seconds": t, "min_seconds": min(ts),
                             "tokens_per_second": tokens / t, "vs_swap_per_group": swap / t, "repeats": len(ts)})
                print(f"{phase:8s} {name:26s} {t:8.3f} s  {tokens / t:8.1f} tokens/s  x{swap / t:.2f} vs swap",
                      flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "multi_adapter.json")
    args = parser.parse_args(argv)
    from pefttutor.models import load_smollm2
    from pefttutor.study.runner import provenance

    device = torch.device("cpu")
    model, tok = load_smollm2(device=device)
    mrs = [f"name[{n}], food[{f}], area[{a}]" for n, f, a in zip(
        ("The Eagle", "Zizzi", "Aromi", "The Punter", "Bibimbap House", "Cotto", "Giraffe", "The Mill"),
        ("French", "Italian", "English", "Chinese", "Korean", "Fast food", "Indian", "Japanese"),
        ("riverside", "city centre") * 4)]
    prompts = [data.restaurant_prompt(mrs[i % len(mrs)]) for i in range(args.batch)]
    ids, mask = data.left_pad(tok(prompts)["input_ids"], data.pad_id_of(tok))
    rows = measure(model, ids, mask, args.adapters, args.r, args.new_tokens, args.repeats)
    result = {"provenance": provenance(device),
              "setup": {"model": "SmolLM2-135M-Instruct", "adapters": args.adapters, "targets": list(TARGETS),
                        "r": args.r, "batch": args.batch, "prompt_tokens": int(mask.sum()),
                        "padded_length": ids.shape[1], "new_tokens": args.new_tokens, "greedy": True},
              "rows": rows}
    checkpoint.write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
