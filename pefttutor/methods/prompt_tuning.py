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

P_e enters as an `input_prefix` in the model's `peft` extension point (`Llama` and `Bert`, also
inside a wrapper such as `BertClassifier`; `pefttutor/models/attention.py`): the model prepends
it to the word embeddings (Bert: before position
and token-type embeddings, as peft does), extends the attention mask by P ones, keeps the virtual
tokens in the KV cache while generating, and returns outputs for the real tokens only, so losses,
`predict_classes` and `generate` work unchanged. Like peft, the parameter is `prompt_embeddings`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pefttutor import checks

from .base import Config, Method, host, host_extension

INITS = ("random", "vocab", "text")


@dataclass(frozen=True)
class PromptTuningConfig(Config):
    """What `apply` did, saved with the weights."""

    n_tokens: int  # P, the number of virtual tokens
    init: str = "random"  # "random", "vocab" or "text"
    init_text: str | None = None  # the text of init="text"

    def check(self) -> None:
        checks.positive_int(self.n_tokens, "n_tokens")
        checks.choice(self.init, "init", INITS)
        if (self.init == "text") != (self.init_text is not None):
            raise ValueError("init='text' needs init_text (and a tokenizer); the other inits take no init_text")
        if self.init_text is not None and not isinstance(self.init_text, str):
            raise ValueError(f"init_text must be a string, got {self.init_text!r}")


class SoftPrompt(nn.Module):
    """P_e (P, d) = `prompt_embeddings`; `input_prefix(B)` gives P_e for every row, (B, P, d)."""

    def __init__(self, prompt_embeddings: torch.Tensor):  # (P, d), the initial values
        super().__init__()
        self.prompt_embeddings = nn.Parameter(prompt_embeddings.detach().clone())

    def input_prefix(self, batch_size: int) -> torch.Tensor:
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


class PromptTuning(Method):
    """Prepend `n_tokens` trainable virtual tokens to the model's input; freeze everything else.

    `init`: "random", "vocab" or "text" (then `init_text` and `tokenizer` are needed). Trainable:
    n_tokens * d, plus the `train` modules. `load` needs no tokenizer (the file holds the trained
    values) and n_tokens equal to the file's.
    """

    name, title, Config = "prompt_tuning", "prompt tuning", PromptTuningConfig
    must_match = ("n_tokens",)
    cannot_merge = "the virtual tokens are extra inputs in front of the text, not a change of any weight"

    def apply(self, model: nn.Module, n_tokens: int, init: str = "random", init_text: str | None = None,
              tokenizer=None, train=()) -> nn.Module:
        config = PromptTuningConfig(n_tokens, init, init_text, train=train)
        if config.init == "text" and tokenizer is None:
            raise ValueError("init='text' needs the model's tokenizer to turn init_text into token ids")
        return self._apply(model, config, tokenizer=tokenizer)

    def check(self, model: nn.Module, config: PromptTuningConfig) -> PromptTuningConfig:
        table = getattr(getattr(host(model, self.title), "embeddings", None), "position_embeddings", None)
        if table is not None and config.n_tokens >= table.num_embeddings:  # Bert's learned positions
            raise ValueError(f"n_tokens={config.n_tokens} leaves no room for real tokens: the model has "
                             f"{table.num_embeddings} positions")
        return config

    def attach(self, model: nn.Module, config: PromptTuningConfig, init: bool = True, tokenizer=None) -> None:
        model_host = host(model, self.title)
        E = model_host.get_input_embeddings()
        prompt = (initial_prompt(E, config.n_tokens, config.init, config.init_text, tokenizer) if init
                  else E.weight.new_zeros(config.n_tokens, E.weight.shape[1]))  # a file's values follow
        model_host.peft[self.name] = SoftPrompt(prompt)

    def detach(self, model: nn.Module) -> None:
        model_host = host(model, self.title)
        if self.name in model_host.peft:
            del model_host.peft[self.name]

    def modules(self, model: nn.Module, config: PromptTuningConfig) -> dict[str, nn.Module]:
        return host_extension(model, self.name, self.title)


METHOD = PromptTuning()


def soft_prompt(model: nn.Module) -> SoftPrompt:
    """The model's SoftPrompt module (its `prompt_embeddings` is P_e, (P, d))."""
    METHOD.get_config(model)
    return host(model, METHOD.title).peft[METHOD.name]


@torch.no_grad()
def nearest_tokens(model: nn.Module, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """For each virtual token, the `k` vocabulary tokens whose embeddings are nearest by cosine.

    Returns (ids, cosines), each (P, k). Lester et al. read learned prompts this way.
    """
    P_e = soft_prompt(model).prompt_embeddings.float()  # (P, d)
    E = host(model, METHOD.title).get_input_embeddings().weight.float()  # (vocab, d)
    cos = nn.functional.normalize(P_e, dim=-1) @ nn.functional.normalize(E, dim=-1).T  # (P, vocab)
    top = cos.topk(k, dim=-1)
    return top.indices, top.values


METHOD.export(globals())
