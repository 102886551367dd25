"""Back-of-the-envelope arithmetic: parameter counts, trainable parameters per method, training memory.

Pure Python (no torch), so the numbers can be checked against papers and against our real models.

**Memory of training** (`training_memory`), for a model of N parameters of which T train:

    weights     N * b                 every parameter is held, trained or frozen
    gradients   T * b                 one gradient per trainable parameter
    optimizer   T * s * b             s states per trainable parameter: Adam/AdamW keep two moments
                                      (s = 2), SGD with momentum one, plain SGD none
    activations see `activation_memory_bytes`: grows with batch size x sequence length

with b bytes per value (fp32: 4). Full finetuning with Adam in fp32 (T = N, b = 4, s = 2) costs
4 + 4 + 8 = **16 bytes per parameter** before activations; a PEFT method keeps the frozen weights
(4 bytes each) and pays the other 12 bytes only for its few trainable parameters.

**Architectures** (`Arch`, presets in `ARCHS`): just enough shape to count parameters exactly for
three families, read from the models' configs:

* "llama": no biases, RMSNorm (one weight vector), SwiGLU MLP (gate, up, down), rotary positions,
  grouped-query attention (k_proj / v_proj are d x n_kv_heads * head_dim);
* "bert": biases, LayerNorm (weight + bias), GELU MLP (two matrices), learned absolute and
  token-type (2) embeddings, an embedding LayerNorm and the pooler (d x d + d); "roberta" is the
  same with one token type;
* "gpt": GPT-2/3 style: biases, LayerNorm, GELU MLP, learned positions, a final LayerNorm.

A tied output layer (the token-embedding matrix reused as the LM head) is counted once.

**Trainable parameters per method** (`peft_params(arch, method, **hparams)`), a head not included:

* "full": every parameter;
* "lora": r (d_in + d_out) per adapted matrix (Hu et al. 2021), on `targets` in every layer;
* "prompt_tuning": n_tokens * d_model (soft prompt, Lester et al. 2021);
* "prefix_tuning": 2 * n_layers * n_tokens * kv_dim (keys and values in every layer, Li & Liang 2021);
  with `reparam=True` the training-time MLP (Embedding(n, kv_dim) -> Linear(kv_dim, hidden) ->
  tanh -> Linear(hidden, 2 L kv_dim), kv_dim being peft's `token_dim`: d_model without grouped-query
  attention) is counted instead, since it is what trains;
* "adapters": adapters * (2 m d + d + m) with bottleneck `size` m (Houlsby et al. 2019: down- and
  up-projection with biases); "houlsby" puts two in every layer, "pfeiffer" and "parallel" one;
* "llama_adapter": n_layers * (n_tokens * d_model + n_heads) (Zhang et al. 2023: an adaption
  prompt and a per-head zero-init gate in each of the top n_layers layers);
* "dora": LoRA's count plus d_out per adapted matrix, the magnitude vector (Liu et al. 2024);
* "ia3": one number per scaled feature: d_out per target, d_in per `feedforward` target (Liu et al.
  2022: keys, values and the feed-forward output projection's input by default);
* "qlora": LoRA's count, on every block linear by default (Dettmers et al. 2023): the base is
  stored in 4 bits and trains nothing.

**A 4-bit base** (QLoRA, `quantized_bytes`): each quantized matrix of n weights stores n / 2 bytes
of codes and one absmax per block of 64: 4 bytes, or with double quantization 1 byte plus 4 per
256 absmax and a 4-byte mean, so `bits_per_parameter` is 4 + 32/64 = 4.5, or 4 + 8/64 +
32/(64 * 256) ~ 4.127 (the paper's section 3); everything else keeps its dtype.
`training_memory(arch, "qlora")` counts the frozen weights so.

Sizes are in bytes; `gb()` divides by 1e9 (decimal gigabytes, as GPU memory is quoted).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

BYTES_PER_VALUE = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "momentum": 1, "sgd": 0}
FAMILIES = ("llama", "bert", "roberta", "gpt")
METHODS = ("full", "lora", "prompt_tuning", "prefix_tuning", "adapters", "llama_adapter", "dora", "ia3", "qlora")
PLACEMENTS = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}  # bottleneck adapters per layer
# `peft_params`' hyperparameters per method, with their defaults
HPARAMS = {
    "full": {},
    "lora": {"r": 8, "targets": ("q", "v")},
    "prompt_tuning": {"n_tokens": 20},
    "prefix_tuning": {"n_tokens": 20, "reparam": False, "hidden": 512},
    "adapters": {"size": 64, "placement": "houlsby"},
    "llama_adapter": {"n_tokens": 10, "n_layers": None},  # None: every layer
    "dora": {"r": 8, "targets": ("q", "v")},
    "ia3": {"targets": ("k", "v", "down"), "feedforward": ("down",)},
    "qlora": {"r": 8, "targets": None, "double_quant": True},  # targets None: every linear of the block
}
QUANT_BLOCK, QUANT_BLOCK_ABSMAX = 64, 256  # QLoRA's block sizes (pefttutor.quant.BLOCK, BLOCK_ABSMAX)

# Canonical names of a block's weight matrices, and the module names they go by in our models / HF.
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
ALIASES = {
    "q_proj": "q", "query": "q",
    "k_proj": "k", "key": "k",
    "v_proj": "v", "value": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}


@dataclass(frozen=True)
class Arch:
    """The shape of a transformer, enough to count its parameters. See the module docstring."""

    name: str
    d_model: int
    n_layers: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    family: str = "llama"
    n_positions: int = 0  # learned position embeddings (bert, gpt); 0 for rotary (llama)
    tied_embeddings: bool = True

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; valid: {', '.join(FAMILIES)}")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("d_model must divide into n_heads, and n_heads into n_kv_heads groups")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of k_proj / v_proj outputs: n_kv_heads * head_dim (= d_model without GQA)."""
        return self.n_kv_heads * self.head_dim


ARCHS = {
    a.name: a
    for a in (
        # our two models (values from their config.json files; the tests compare)
        Arch("minilm", d_model=384, n_layers=6, d_ff=1536, n_heads=12, n_kv_heads=12, vocab=30522,
             family="bert", n_positions=512),
        Arch("smollm2-135m", d_model=576, n_layers=30, d_ff=1536, n_heads=9, n_kv_heads=3, vocab=49152),
        # the papers' models
        Arch("gpt3-175b", d_model=12288, n_layers=96, d_ff=4 * 12288, n_heads=96, n_kv_heads=96, vocab=50257,
             family="gpt", n_positions=2048),
        Arch("llama-7b", d_model=4096, n_layers=32, d_ff=11008, n_heads=32, n_kv_heads=32, vocab=32000,
             tied_embeddings=False),
        Arch("llama-13b", d_model=5120, n_layers=40, d_ff=13824, n_heads=40, n_kv_heads=40, vocab=32000,
             tied_embeddings=False),
        Arch("llama-65b", d_model=8192, n_layers=80, d_ff=22016, n_heads=64, n_kv_heads=64, vocab=32000,
             tied_embeddings=False),
        Arch("llama2-70b", d_model=8192, n_layers=80, d_ff=28672, n_heads=64, n_kv_heads=8, vocab=32000,
             tied_embeddings=False),
        Arch("gpt2-medium", d_model=1024, n_layers=24, d_ff=4096, n_heads=16, n_kv_heads=16, vocab=50257,
             family="gpt", n_positions=1024),
        Arch("roberta-base", d_model=768, n_layers=12, d_ff=3072, n_heads=12, n_kv_heads=12, vocab=50265,
             family="roberta", n_positions=514),
        Arch("roberta-large", d_model=1024, n_layers=24, d_ff=4096, n_heads=16, n_kv_heads=16, vocab=50265,
             family="roberta", n_positions=514),
    )
}
ARCHS["minilm-l6"] = ARCHS["minilm"]  # all-MiniLM-L6-v2 by its full name
# `get_arch` reads a dict with these keys (family, positions and tied are optional)
DIMENSIONS = {"layers": "n_layers", "hidden": "d_model", "heads": "n_heads", "kv_heads": "n_kv_heads",
              "ffn": "d_ff", "vocab": "vocab", "family": "family", "positions": "n_positions",
              "tied": "tied_embeddings"}


def get_arch(arch: Arch | str | dict) -> Arch:
    """An `Arch`; a preset looked up by name in `ARCHS`; or one built from a dict of dimensions:
    {"layers", "hidden", "heads", "ffn", "vocab"} and optionally "kv_heads" (default heads),
    "family" ("llama"), "positions" (0), "tied" (True)."""
    if isinstance(arch, Arch):
        return arch
    if isinstance(arch, dict):
        unknown = set(arch) - set(DIMENSIONS) - {"name"}
        missing = {"layers", "hidden", "heads", "ffn", "vocab"} - set(arch)
        if unknown or missing:
            raise ValueError(f"an architecture dict needs {sorted(missing) or 'nothing more'} and takes only "
                             f"{', '.join(DIMENSIONS)}; unknown: {sorted(unknown) or 'none'}")
        dims = {DIMENSIONS[k]: v for k, v in arch.items() if k != "name"}
        dims.setdefault("n_kv_heads", dims["n_heads"])
        return Arch(name=arch.get("name", "custom"), **dims)
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; presets: {', '.join(ARCHS)} (or a dict of dimensions)")
    return ARCHS[arch]


# ------------------------------------------------------------------------------------------------
# Parameter counts
# ------------------------------------------------------------------------------------------------


def block_linears(arch: Arch | str) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each weight matrix of one transformer block, by canonical name."""
    a = get_arch(arch)
    d, q_out = a.d_model, a.n_heads * a.head_dim
    shapes = {"q": (d, q_out), "k": (d, a.kv_dim), "v": (d, a.kv_dim), "o": (q_out, d)}
    if a.family == "llama":
        shapes["gate"] = (d, a.d_ff)
    shapes.update(up=(d, a.d_ff), down=(a.d_ff, d))
    return shapes


def block_params(arch: Arch | str) -> int:
    """Parameters of one transformer block (matrices, their biases, the norms' vectors)."""
    a = get_arch(arch)
    linears = block_linears(a).values()
    weights = sum(i * o for i, o in linears)
    if a.family == "llama":  # no biases; two RMSNorm weight vectors
        return weights + 2 * a.d_model
    biases = sum(o for _, o in linears)
    return weights + biases + 2 * 2 * a.d_model  # two LayerNorms, weight + bias each


def embedding_params(arch: Arch | str) -> int:
    """Token (+ position, token-type) embeddings, their LayerNorm, and an untied LM head."""
    a = get_arch(arch)
    n = a.vocab * a.d_model + a.n_positions * a.d_model
    if a.family in ("bert", "roberta"):  # token-type embeddings (2 types, RoBERTa 1) + embedding LayerNorm
        n += (2 if a.family == "bert" else 1) * a.d_model + 2 * a.d_model
    if not a.tied_embeddings:
        n += a.vocab * a.d_model  # a separate output matrix
    return n


def total_params(arch: Arch | str) -> int:
    """Every parameter of the model, a tied LM head counted once."""
    a = get_arch(arch)
    n = embedding_params(a) + a.n_layers * block_params(a)
    if a.family == "llama":
        n += a.d_model  # final RMSNorm
    elif a.family == "gpt":
        n += 2 * a.d_model  # final LayerNorm
    else:
        n += a.d_model * a.d_model + a.d_model  # BERT pooler
    return n


def _canonical(targets: str | Iterable[str], arch: Arch) -> list[str]:
    targets = [targets] if isinstance(targets, str) else list(targets)
    valid = block_linears(arch)
    out = []
    for t in targets:
        name = ALIASES.get(t, t)
        if name not in valid:
            raise ValueError(f"unknown target {t!r} for {arch.name}; valid: {', '.join(valid)} "
                             f"(or {', '.join(k for k, v in ALIASES.items() if v in valid)})")
        out.append(name)
    if not out:
        raise ValueError("no targets given")
    return out


def lora_params(arch: Arch | str, r: int = 8, targets: str | Iterable[str] = ("q", "v")) -> int:
    """LoRA: A (r x d_in) and B (d_out x r) on each target matrix of every layer."""
    a = get_arch(arch)
    shapes = block_linears(a)
    return a.n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in _canonical(targets, a))


def peft_params(arch: Arch | str | dict, method: str = "full", **hparams) -> int:
    """Trainable parameters of `method` on `arch` (a head on top is not included).

    full                                     every parameter (`total_params`)
    lora(r=8, targets=("q", "v"))            n_layers * sum over targets of r (d_in + d_out)
    prompt_tuning(n_tokens=20)               n_tokens * d_model
    prefix_tuning(n_tokens=20, reparam=False, hidden=512)
                                             2 n_layers n_tokens kv_dim; with reparam the MLP's
                                             n kv_dim + (kv_dim + 1) hidden + (hidden + 1) 2 n_layers kv_dim
    adapters(size=64, placement="houlsby")   per_layer * n_layers * (2 size d_model + d_model + size)
    llama_adapter(n_tokens=10, n_layers=None)
                                             n_layers * (n_tokens * d_model + n_heads); None = all layers
    dora(r=8, targets=("q", "v"))            lora's count + n_layers * sum over targets of d_out
    qlora(r=8, targets=None, double_quant=True)  (None: every block linear)
                                             lora's count (double_quant only changes the base's bytes)
    ia3(targets=("k", "v", "down"), feedforward=("down",))
                                             n_layers * sum over targets of d_out (d_in if feedforward)
    """
    a = get_arch(arch)
    if method not in HPARAMS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    unknown = set(hparams) - set(HPARAMS[method])
    if unknown:
        raise ValueError(f"{method} takes {sorted(HPARAMS[method]) or 'no hyperparameters'}, got {sorted(unknown)}")
    h = {**HPARAMS[method], **hparams}
    d, L = a.d_model, a.n_layers
    if method == "full":
        return total_params(a)
    if method == "qlora":
        return lora_params(a, h["r"], h["targets"] or tuple(block_linears(a)))
    if method in ("lora", "dora"):
        magnitudes = L * sum(block_linears(a)[t][1] for t in _canonical(h["targets"], a)) if method == "dora" else 0
        return lora_params(a, **h) + magnitudes
    if method == "ia3":
        shapes, feedforward = block_linears(a), set(_canonical(h["feedforward"], a)) if h["feedforward"] else set()
        return L * sum(shapes[t][0] if t in feedforward else shapes[t][1] for t in _canonical(h["targets"], a))
    if method == "prompt_tuning":
        return h["n_tokens"] * d
    if method == "prefix_tuning":
        n, width = h["n_tokens"], 2 * L * a.kv_dim  # every layer's keys and values, per virtual token
        if not h["reparam"]:
            return n * width
        return n * a.kv_dim + (a.kv_dim + 1) * h["hidden"] + (h["hidden"] + 1) * width
    if method == "adapters":
        if h["placement"] not in PLACEMENTS:
            raise ValueError(f"unknown placement {h['placement']!r}; valid: {', '.join(PLACEMENTS)}")
        m = h["size"]
        return PLACEMENTS[h["placement"]] * L * (2 * m * d + d + m)
    n_layers = L if h["n_layers"] is None else h["n_layers"]
    if not 1 <= n_layers <= L:
        raise ValueError(f"n_layers must be between 1 and {L} for {a.name}, got {n_layers}")
    return n_layers * (h["n_tokens"] * d + a.n_heads)


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


def bits_per_parameter(double_quant: bool = True) -> float:
    """4-bit storage per weight for large matrices: 4 + 32/64 = 4.5 bits, ~4.127 with double quantization."""
    return 4 + (8 / QUANT_BLOCK + 32 / (QUANT_BLOCK * QUANT_BLOCK_ABSMAX) if double_quant else 32 / QUANT_BLOCK)


def quantized_matrix_bytes(n: int, double_quant: bool = True) -> int:
    """Bytes of one matrix of n weights in 4 bits, exactly: ceil(n / 2) of codes, ceil(n / 64)
    absmax of 4 bytes, or of 1 byte plus ceil(n / 64 / 256) fp32 constants and the fp32 mean."""
    blocks = -(-n // QUANT_BLOCK)
    constants = blocks + 4 * -(-blocks // QUANT_BLOCK_ABSMAX) + 4 if double_quant else 4 * blocks
    return -(-n // 2) + constants


def quantized_bytes(arch: Arch | str | dict, targets: str | Iterable[str] | None = None, double_quant: bool = True,
                    dtype: str = "fp32") -> float:
    """Bytes of the model with `targets` (None: every linear) of every block stored in 4 bits
    (QLoRA), all else in `dtype`."""
    a = get_arch(arch)
    targets = targets or tuple(block_linears(a))
    if dtype not in BYTES_PER_VALUE:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(BYTES_PER_VALUE)}")
    shapes = block_linears(a)
    n = [shapes[t][0] * shapes[t][1] for t in dict.fromkeys(_canonical(targets, a))]
    return (total_params(a) - a.n_layers * sum(n)) * BYTES_PER_VALUE[dtype] + a.n_layers * sum(
        quantized_matrix_bytes(k, double_quant) for k in n)


def training_memory(
    arch: Arch | str | dict | int,
    method: str = "full",
    *,
    n_trainable: int | None = None,
    dtype: str = "fp32",
    optimizer: str = "adamw",
    batch_size: int = 0,
    seq_len: int = 0,
    **hparams,
) -> dict[str, float]:
    """Bytes to train `method` on `arch`: weights, gradients, optimizer states, their total.

    arch:        a preset name, an `Arch`, a dict of dimensions, or a bare parameter count (int,
                 with `n_trainable` counted among those parameters);
    method:      as in `peft_params` (with its **hparams); or give `n_trainable` directly;
    dtype:       how weights, gradients and states are stored ("fp32", "bf16", "fp16", ...);
    optimizer:   "adam"/"adamw" (2 states), "momentum" (1), "sgd" (0).
    A PEFT method's parameters are stored beside the frozen model's (weights: N + T values); with
    "qlora" the frozen model's bytes are `quantized_bytes` (its hparams: r, targets, double_quant).
    With batch_size and seq_len (and an architecture, not an int) the dict also holds
    "activations (estimate)" from `activation_memory_bytes` (backpropagation through every block,
    which every method here needs except training the head alone), included in the total.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZER_STATES)}")
    if dtype not in BYTES_PER_VALUE:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(BYTES_PER_VALUE)}")
    is_count = isinstance(arch, (int, float))
    if is_count and method == "qlora":
        raise ValueError("qlora needs an architecture (preset name, Arch or dict) to know which weights are 4-bit")
    n = int(arch) if is_count else total_params(arch)
    if n_trainable is not None:
        t = int(n_trainable)
    elif is_count and method != "full":
        raise ValueError("a bare parameter count needs n_trainable (or an architecture to count the method on)")
    else:
        t = n if is_count else peft_params(arch, method, **hparams)
    if not 0 <= t <= n:
        raise ValueError(f"n_trainable must be between 0 and n_params ({n:,}), got {t:,}")
    b = BYTES_PER_VALUE[dtype]
    added = 0 if is_count or method == "full" else t  # PEFT parameters come on top of the frozen model
    weights = (n + added) * b
    if method == "qlora":
        h = {**HPARAMS["qlora"], **hparams}
        weights = quantized_bytes(arch, h["targets"], h["double_quant"], dtype) + t * b
    out = {"weights": weights, "gradients": t * b, "optimizer": t * OPTIMIZER_STATES[optimizer] * b}
    if batch_size and seq_len:
        if is_count:
            raise ValueError("activations need an architecture (preset name, Arch or dict), not a bare count")
        out["activations (estimate)"] = activation_memory_bytes(arch, batch_size, seq_len, b)
    out["total"] = sum(out.values())
    return out


def training_memory_bytes(arch: Arch | str | dict | int, method: str = "full", **kwargs) -> float:
    """The total of `training_memory` (same arguments). Full finetuning, AdamW, fp32: 16 bytes per parameter."""
    return training_memory(arch, method, **kwargs)["total"]


def mixed_precision_bytes(arch: Arch | str | dict, method: str = "full", **hparams) -> float:
    """Bytes of weights, gradients and AdamW states in mixed precision, as large models train: each
    trained parameter 2 + 2 + 4 + 8 = 16 bytes (16-bit weight and gradient, fp32 master copy, two fp32
    moments: no less than in fp32), each frozen one 2 (16-bit). No activations (`activation_memory_bytes`).
    `training_memory(dtype="bf16")` instead keeps everything in 16 bits: a lower bound few optimizers reach."""
    n, t = total_params(arch), peft_params(arch, method, **hparams)
    return 2 * (0 if method == "full" else n) + 16 * t


def activation_memory_bytes(
    arch: Arch | str,
    batch_size: int,
    seq_len: int,
    bytes_per_value: float = 4,
    dropout: bool | None = None,
) -> float:
    """Rough bytes of the activations autograd keeps for the backward pass of all blocks.

    Generalizes Korthikanti et al. 2022 (arXiv:2205.05198, Eq. 1: s b h (34 + 5 a s / h) bytes per
    layer for 16-bit GPT activations with 1-byte dropout masks), counting per block, with
    s = seq_len, b = batch_size, h = d_model, a = n_heads:
      attention: its input, q, k, v, the softmax output (a s^2 b), the dropout mask and output,
                 the output projection's input, the output dropout mask;
      MLP:       its input, the activations of width d_ff (2 for GELU, 4 for SwiGLU), a dropout mask;
      norms:     their two inputs.
    Dropout defaults to on for bert/gpt and off for llama. No flash attention, no recomputation,
    no embeddings or logits (an LM's logits add b s vocab values). An estimate, not a measurement.
    """
    a = get_arch(arch)
    s, b, h = seq_len, batch_size, a.d_model
    drop = a.family != "llama" if dropout is None else dropout
    sbh, scores = s * b * h, a.n_heads * s * s * b
    values = sbh + s * b * (h + 2 * a.kv_dim) + scores + sbh  # input, q k v, softmax, o_proj input
    masks = 0.0
    if drop:
        values += scores  # dropout output on the attention probabilities
        masks += scores + sbh  # attention-probability and output dropout masks (1 byte)
    values += sbh + (4 if a.family == "llama" else 2) * s * b * a.d_ff  # MLP input and inner activations
    masks += sbh if drop else 0
    values += 2 * sbh  # the two norms' inputs
    return a.n_layers * (values * bytes_per_value + masks)


def gb(n_bytes: float) -> float:
    """Bytes -> decimal gigabytes (1e9 bytes)."""
    return n_bytes / 1e9
