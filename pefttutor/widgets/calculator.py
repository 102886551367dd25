"""The memory and parameter calculator (notebook 06): `pefttutor.calculator` behind controls."""

from __future__ import annotations

import html
import math

from ipywidgets import Checkbox, Dropdown, IntSlider, SelectMultiple

from .. import calculator as calc
from .. import plots
from .panel import Panel, set_options

COMMON = ("arch", "method", "dtype", "optimizer", "batch_size", "seq_len")  # every method's controls


def gigabytes(n_bytes: float) -> str:
    """Decimal gigabytes to 3 significant digits, without an exponent: 0.000372, 13.5, 2,810."""
    x = calc.gb(n_bytes)
    digits = max(0, 2 - math.floor(math.log10(x))) if x > 0 else 0
    return f"{x:,.{digits}f}"


def calculator_panel(arch: str = "llama-7b", method: str = "lora", dtype: str = "bf16", batch_size: int = 4,
                     seq_len: int = 512) -> Panel:
    """Trainable parameters and training memory (weights, gradients, optimizer states, activations)
    of a method on an architecture, beside full finetuning's. Only the chosen method's settings are
    shown (the calculator's `HPARAMS`); QLoRA's frozen weights count in 4 bits (`quantized_bytes`).
    State: the settings, "trainable", "total params", "memory" and "full finetuning" (the
    `training_memory` dicts, in bytes)."""
    h = calc.HPARAMS
    depth = calc.get_arch(arch).n_layers
    controls = {
        "arch": Dropdown(options=[n for n, a in calc.ARCHS.items() if a.name == n], value=arch, description="model"),
        "method": Dropdown(options=calc.METHODS, value=method, description="method"),
        "r": IntSlider(value=h["lora"]["r"], min=1, max=256, description="rank r"),
        "targets": SelectMultiple(options=list(calc.block_linears(arch)), value=h["lora"]["targets"], rows=4,
                                  description="targets"),  # LoRA, DoRA, QLoRA and IA3 share one choice
        "double_quant": Checkbox(value=h["qlora"]["double_quant"], description="double quantization"),
        "size": IntSlider(value=h["adapters"]["size"], min=1, max=1024, description="bottleneck m"),
        "placement": Dropdown(options=list(calc.PLACEMENTS), value=h["adapters"]["placement"], description="placement"),
        "n_tokens": IntSlider(value=h["prompt_tuning"]["n_tokens"], min=1, max=200, description="tokens"),
        "reparam": Checkbox(value=h["prefix_tuning"]["reparam"], description="MLP reparameterization"),
        "hidden": IntSlider(value=h["prefix_tuning"]["hidden"], min=1, max=4096, description="MLP width"),
        "n_layers": IntSlider(value=depth, min=1, max=depth, description="layers"),  # LLaMA-Adapter's top layers
        "dtype": Dropdown(options=["fp32", "bf16", "fp16"], value=dtype, description="dtype"),
        "optimizer": Dropdown(options=list(calc.OPTIMIZER_STATES), value="adamw", description="optimizer"),
        "batch_size": IntSlider(value=batch_size, min=1, max=256, description="batch"),
        "seq_len": IntSlider(value=seq_len, min=1, max=8192, description="tokens/seq"),
    }

    def link(c):
        a = calc.get_arch(c["arch"].value)
        set_options(c["targets"], calc.block_linears(a), fallback=h["lora"]["targets"])
        every_layer = c["n_layers"].value == c["n_layers"].max
        c["n_layers"].max = a.n_layers
        if every_layer:
            c["n_layers"].value = a.n_layers

    def uses(values):
        own = set(h[values["method"]]) & set(controls)
        if not values["reparam"]:
            own.discard("hidden")
        return {*COMMON, *own}

    def compute(arch, method, dtype, optimizer, batch_size, seq_len, **hparams):
        setting = {"dtype": dtype, "optimizer": optimizer, "batch_size": batch_size, "seq_len": seq_len}
        return {"arch": arch, "method": method, "hparams": hparams, **setting,
                "trainable": calc.peft_params(arch, method, **hparams), "total params": calc.total_params(arch),
                "memory": calc.training_memory(arch, method, **setting, **hparams),
                "full finetuning": calc.training_memory(arch, "full", **setting)}

    return Panel(controls, compute, _draw, uses, link)


def _draw(s):
    columns = {s["method"]: s["memory"]} | ({"full finetuning": s["full finetuning"]} if s["method"] != "full" else {})
    trainable = {s["method"]: s["trainable"], "full finetuning": s["total params"]}

    def row(label, cells):
        return f"<tr><td>{label}</td>{''.join(f'<td>{c}</td>' for c in cells)}</tr>"

    rows = [f"<tr><th></th>{''.join(f'<th>{html.escape(c)}</th>' for c in columns)}</tr>",
            row("trainable parameters", (f"{trainable[c]:,} ({100 * trainable[c] / s['total params']:.4g}%)"
                                         for c in columns)),
            *(row(f"{part}, GB", (gigabytes(m[part]) for m in columns.values())) for part in s["memory"])]
    note = ""
    if s["method"] == "qlora":
        bits = calc.bits_per_parameter(s["hparams"]["double_quant"])
        note = (f" The frozen {', '.join(s['hparams']['targets'])} matrices are stored in 4 bits ({bits:.3f} bits per "
                f"weight with their constants), the rest of the model in {s['dtype']}.")
    text = (f"<b>{html.escape(s['method'])} on {html.escape(s['arch'])}</b>, {s['dtype']}, {s['optimizer']}, "
            f"batch {s['batch_size']} x {s['seq_len']} tokens.{note}<table>{''.join(rows)}</table>")

    parts = [p for p in s["memory"] if p != "total"]
    fig, ax = plots.figure(width=8, height=1.2 + 0.5 * len(columns))
    left = [0.0] * len(columns)
    for i, part in enumerate(parts):
        widths = [calc.gb(m[part]) for m in columns.values()]
        ax.barh(list(columns), widths, left=left, color=f"C{i}", label=part)
        left = [a + b for a, b in zip(left, widths)]
    for y, m in enumerate(columns.values()):
        ax.annotate(f" {gigabytes(m['total'])} GB", (calc.gb(m["total"]), y), va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.25 * max(left))  # room for the totals
    ax.set_xlabel("training memory (GB)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    ax.set_title(f"{s['arch']}: {s['method']} vs full finetuning ({s['dtype']}, {s['optimizer']}, "
                 f"batch {s['batch_size']} x {s['seq_len']})", fontsize=9)
    return text, fig
