"""The prefix attention viewer (notebook 03): how much attention each layer and head pays to the prefix."""

from __future__ import annotations

import html

from ipywidgets import Dropdown, IntSlider

from .. import attention_maps, plots
from ..methods import prefix_tuning
from .panel import Panel

MAX_TOKEN_LABELS = 80  # longer examples get no token names on the axis


def prefix_attention_viewer(model, tokenizer, examples: dict[str, str]) -> Panel:
    """For each example (label -> text, run alone through the prefix-tuned `model`): the attention
    mass on the P prefix slots per layer and head, averaged over the example's tokens (a layers x
    heads heatmap), and for one layer per head and token (`attention_maps.prefix_mass`). State:
    "prefix" and "real" (L, H), the token means of the mass on the prefix and on the real tokens
    (they sum to 1), "per token" (H, T) of the chosen layer, and "tokens"."""
    device = next(model.parameters()).device
    P, masses = prefix_tuning.get_config(model).n_tokens, {}
    for label, text in examples.items():
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
        prefix, real = attention_maps.prefix_mass(model, ids)  # (1, L, H, T) each
        masses[label] = ([tokenizer.decode([i]) for i in ids[0].tolist()], prefix[0].cpu(), real[0].cpu())
    n_layers = next(iter(masses.values()))[1].shape[0]
    controls = {"example": Dropdown(options=list(examples), description="example"),
                "layer": IntSlider(value=n_layers - 1, min=0, max=n_layers - 1, description="layer")}

    def compute(example, layer):
        tokens, prefix, real = masses[example]
        return {"example": example, "layer": layer, "P": P, "tokens": tokens, "prefix": prefix.mean(-1),
                "real": real.mean(-1), "per token": prefix[layer]}

    return Panel(controls, compute, _draw)


def _draw(s):
    fig, (by_layer, by_token) = plots.figure(1, 2, width=11, height=4.4, gridspec_kw={"width_ratios": [1, 2.4]})
    image = by_layer.imshow(s["prefix"].numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
    by_layer.axhspan(s["layer"] - 0.5, s["layer"] + 0.5, fill=False, edgecolor="red", lw=1.5)
    by_layer.set_xlabel("head")
    by_layer.set_ylabel("layer")
    by_layer.set_title("mean over the tokens", fontsize=9)
    by_token.imshow(s["per token"].numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
    tokens = s["tokens"]
    if len(tokens) <= MAX_TOKEN_LABELS:
        by_token.set_xticks(range(len(tokens)), [t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=6)
    by_token.set_xlabel("query token")
    by_token.set_ylabel("head")
    by_token.set_title(f"layer {s['layer']}, per token", fontsize=9)
    for ax in (by_layer, by_token):
        ax.grid(False)
    fig.colorbar(image, ax=by_token, label="attention on the prefix")
    fig.suptitle(f"Attention mass on the {s['P']} prefix slots", fontsize=10)
    layer = s["prefix"][s["layer"]]
    text = (f"<b>{html.escape(s['example'])}</b> ({len(tokens)} tokens): {s['prefix'].mean():.1%} of the attention "
            f"goes to the prefix on average over layers, heads and tokens; layer {s['layer']}: {layer.mean():.1%} "
            f"(heads {layer.min():.1%} to {layer.max():.1%}); the real tokens get the rest.")
    return text, fig
