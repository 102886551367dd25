"""Prompt tuning: a trainable soft prompt, from scratch (Lester et al. 2021, arXiv:2104.08691).

The whole model stays frozen. P vectors ("virtual tokens") are learned and put in front of the
embedded input, where a hard prompt's token embeddings would be:

    X_e = E[x_1..x_T]  (T, d)        [P_e ; X_e]  (P + T, d)  ->  frozen model  ->  outputs of x_1..x_T

P_e (P x d) is the only trainable tensor: P * d parameters (SmolLM2, d = 576: 20 tokens = 11,520).
Unlike a hard prompt, whose tokens are picked from the vocabulary (a discrete argmax with no
gradient), P_e lives anywhere in R^{P x d} and is trained by backpropagation through the frozen model.

    model = prompt_tuning.apply(model, n_tokens=20, init="text", init_text="negative neutral positive",
                                tokenizer=tok)                    # freeze all, add P_e
    ...train...
    prompt_tuning.save(model, "prompt.safetensors")                # 20 x 576 numbers

Initialisations (`init`), as in the paper and HF peft: "random" (N(0, sigma^2) with sigma the
standard deviation of the vocabulary's embeddings, so the vectors start at the scale of real ones;
peft's RANDOM uses N(0, 1), the paper uniform [-0.5, 0.5] for T5), "vocab" (rows of P uniformly
sampled vocabulary tokens, peft's SAMPLE_VOCAB) and "text" (the embeddings of the tokens of
`init_text`, e.g. the class labels, repeated or cut to P tokens; peft's TEXT, special tokens included).

P_e enters through the models' `soft_prompt` input hook (`Llama` and `Bert`, also inside a wrapper
such as `BertClassifier`): the model prepends it to the word embeddings (Bert: before position
and token-type embeddings, as peft does), extends the attention mask by P ones, keeps the virtual
tokens in the KV cache while generating, and returns outputs for the real tokens only, so losses,
`predict_classes` and `generate` work unchanged. Like peft, the parameter is `prompt_embeddings`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pefttutor import checkpoint, params

_METADATA_KEY = "pefttutor.prompt_tuning"  # the PromptTuningConfig as JSON in the safetensors header
HOOK = "soft_prompt"  # the input hook attribute of Llama and Bert (None until prompt tuning is applied)
INITS = ("random", "vocab", "text")


@dataclass(frozen=True)
class PromptTuningConfig:
    """What `apply` did; kept on the model as `model.prompt_tuning_config` and saved with the weights."""

    n_tokens: int  # P, the number of virtual tokens
    init: str = "random"  # "random", "vocab" or "text"
    init_text: str | None = None  # the text of init="text"
    train: tuple[str, ...] = ()  # modules trained in full beside the prompt (e.g. a classifier head)


class SoftPrompt(nn.Module):
    """P_e (P, d) = `prompt_embeddings`; called with a batch size it returns P_e for every row, (B, P, d)."""

    def __init__(self, prompt_embeddings: torch.Tensor):  # (P, d), the initial values
        super().__init__()
        self.prompt_embeddings = nn.Parameter(prompt_embeddings.detach().clone())

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.prompt_embeddings[None].expand(batch_size, -1, -1)  # (B, P, d), no copy

    def extra_repr(self) -> str:
        P, d = self.prompt_embeddings.shape
        return f"P={P}, d={d}, P*d={P * d:,} params"


def text_token_ids(tokenizer, text: str, n_tokens: int) -> list[int]:
    """The token ids of `text` (special tokens included, as peft), repeated or cut to `n_tokens`."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError(f"init_text {text!r} encodes to no tokens")
    return (ids * math.ceil(n_tokens / len(ids)))[:n_tokens]


@torch.no_grad()
def initial_prompt(embeddings: nn.Embedding, n_tokens: int, init: str = "random",
                   init_text: str | None = None, tokenizer=None) -> torch.Tensor:
    """P_e before training, (n_tokens, d), on the embeddings' device and dtype (see the module docstring)."""
    E = embeddings.weight  # (vocab, d)
    if init == "random":
        return torch.randn(n_tokens, E.shape[1], device=E.device).to(E.dtype) * E.float().std()
    if init == "vocab":
        ids = torch.randint(0, E.shape[0], (n_tokens,), device=E.device)
    else:
        ids = torch.tensor(text_token_ids(tokenizer, init_text, n_tokens), device=E.device)
    return E[ids].clone()  # (n_tokens, d)


def host(model: nn.Module) -> nn.Module:
    """The module with the `soft_prompt` hook: the model itself (Llama, Bert) or the one inside it."""
    hosts = [m for m in model.modules() if hasattr(m, HOOK) and hasattr(m, "get_input_embeddings")]
    if len(hosts) != 1:
        raise ValueError(f"prompt tuning needs exactly one pefttutor Llama or Bert in the model (a module "
                         f"with a `{HOOK}` input hook); found {len(hosts)}")
    return hosts[0]


def _check(n_tokens, init, init_text, tokenizer, model_host: nn.Module) -> None:
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    table = getattr(getattr(model_host, "embeddings", None), "position_embeddings", None)  # Bert's learned positions
    if table is not None and n_tokens >= table.num_embeddings:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for real tokens: the model has "
                         f"{table.num_embeddings} positions")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if (init == "text") != (init_text is not None):
        raise ValueError("init='text' needs init_text (and a tokenizer); the other inits take no init_text")
    if init == "text" and tokenizer is None:
        raise ValueError("init='text' needs the model's tokenizer to turn init_text into token ids")


def _attach(model: nn.Module, config: PromptTuningConfig, prompt: torch.Tensor) -> nn.Module:
    """Freeze the model, install SoftPrompt(prompt) in the hook, unfreeze `train`, record `config`."""
    if config.train:
        params.find_modules(model, config.train, nn.Module)  # raises, listing valid names, on a typo
    params.freeze(model)
    setattr(host(model), HOOK, SoftPrompt(prompt))  # a new nn.Parameter: trainable
    params.unfreeze(model, config.train)
    model.prompt_tuning_config = config
    return model


def apply(
    model: nn.Module,
    n_tokens: int,
    init: str = "random",
    init_text: str | None = None,
    tokenizer=None,
    train: str | Iterable[str] = (),
) -> nn.Module:
    """Prepend `n_tokens` trainable virtual tokens to the model's input; freeze everything else.

    `init`: "random", "vocab" or "text" (then `init_text` and `tokenizer` are needed). Modules named
    in `train` (e.g. "classifier") stay fully trainable. Bad arguments, unknown `train` names and
    applying twice raise ValueError. Trainable: n_tokens * d, plus the `train` modules.
    Returns the model (changed in place), with the settings recorded as `model.prompt_tuning_config`.
    """
    model_host = host(model)
    if hasattr(model, "prompt_tuning_config") or getattr(model_host, HOOK) is not None:
        raise ValueError("this model already has a soft prompt; apply prompt tuning once, to a fresh model")
    _check(n_tokens, init, init_text, tokenizer, model_host)
    config = PromptTuningConfig(n_tokens, init, init_text, (train,) if isinstance(train, str) else tuple(train))
    prompt = initial_prompt(model_host.get_input_embeddings(), n_tokens, init, init_text, tokenizer)
    return _attach(model, config, prompt)


def get_config(model: nn.Module) -> PromptTuningConfig:
    """The model's PromptTuningConfig; ValueError if prompt tuning was never applied."""
    return checkpoint.attached_config(
        model, "prompt_tuning_config", PromptTuningConfig, "this model has no soft prompt:"
        " call prompt_tuning.apply(model, n_tokens) first"
    )


def soft_prompt(model: nn.Module) -> SoftPrompt:
    """The model's SoftPrompt module (its `prompt_embeddings` is P_e, (P, d))."""
    get_config(model)
    return getattr(host(model), HOOK)


@torch.no_grad()
def nearest_tokens(model: nn.Module, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """For each virtual token, the `k` vocabulary tokens whose embeddings are nearest by cosine.

    Returns (ids, cosines), each (P, k). Lester et al. read learned prompts this way.
    """
    P_e = soft_prompt(model).prompt_embeddings.float()  # (P, d)
    E = host(model).get_input_embeddings().weight.float()  # (vocab, d)
    cos = nn.functional.normalize(P_e, dim=-1) @ nn.functional.normalize(E, dim=-1).T  # (P, vocab)
    top = cos.topk(k, dim=-1)
    return top.indices, top.values


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: P_e plus the `train` modules' state.

    Keys are the model's own state_dict keys (`soft_prompt.prompt_embeddings`, or
    `bert.soft_prompt.prompt_embeddings` in a BertClassifier, and e.g. `classifier.weight`);
    the tensors share memory with the model.
    """
    return checkpoint.module_state(model, (HOOK, *get_config(model).train))


def load_adapter_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Copy `tensors` into the model's prompt strictly (`checkpoint.load_strict`)."""
    checkpoint.load_strict(adapter_state_dict(model), tensors, prefix)


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write only the adapter (see `adapter_state_dict`) and its PromptTuningConfig to a safetensors file, atomically."""
    checkpoint.save(adapter_state_dict(model), path, _METADATA_KEY, asdict(get_config(model)))


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter written by `save`. Returns the model.

    On a model without a soft prompt, one is first attached with the saved settings (no tokenizer
    needed: the file holds the trained values). On a model that has one, n_tokens must equal the
    saved one. Keys and shapes are checked strictly.
    """
    saved, tensors = checkpoint.read(path, _METADATA_KEY, "prompt tuning", PromptTuningConfig)
    if not hasattr(model, "prompt_tuning_config"):
        model_host = host(model)
        if getattr(model_host, HOOK) is not None:
            raise ValueError("this model's soft_prompt hook is taken by something else than prompt tuning")
        E = model_host.get_input_embeddings().weight  # (vocab, d): placeholder values, overwritten below
        _attach(model, saved, E.new_zeros(saved.n_tokens, E.shape[1]))
    checkpoint.require_same(get_config(model), saved, ("n_tokens",), path, "prompt tuning")
    load_adapter_state_dict(model, tensors)
    return model
