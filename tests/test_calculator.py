import pytest
from torch import nn

from pefttutor import calculator as calc
from pefttutor import params


def test_lora_on_gpt3_matches_hu_et_al():
    # LoRA paper, Section 4.2 / Table 4: Wq and Wv of GPT-3 175B, 4,718,592 r trainable parameters
    assert calc.peft_params("gpt3-175b", "lora", r=1, targets=("q", "v")) == 4_718_592
    assert calc.peft_params("gpt3-175b", "lora", r=8, targets=("q", "v")) == 37_748_736
    assert calc.peft_params("gpt3-175b", "lora", r=8, targets=("q_proj", "value")) == 37_748_736  # aliases


def test_full_counts_of_known_models():
    assert calc.total_params("smollm2-135m") == 134_515_008
    assert calc.total_params("minilm") == 22_713_216
    assert calc.total_params("llama-7b") == 6_738_415_616  # Hugging Face's LlamaForCausalLM count
    assert calc.total_params("llama2-70b") == 68_976_648_192
    assert calc.total_params("gpt3-175b") == pytest.approx(175e9, rel=0.01)
    assert calc.peft_params("minilm", "full") == calc.total_params("minilm")


def test_full_finetuning_with_adam_is_16_bytes_per_parameter():
    assert calc.training_memory_bytes(1_000) == 16_000
    assert calc.training_memory(1_000) == {"weights": 4000, "gradients": 4000, "optimizer": 8000, "total": 16000}
    assert calc.training_memory_bytes(1_000, optimizer="sgd") == 8_000
    assert calc.training_memory_bytes(1_000, dtype="bf16") == 8_000
    # PEFT: frozen weights at 4 bytes, 16 bytes only for the trainable ones
    assert calc.training_memory_bytes(1_000, n_trainable=10) == 4 * 990 + 16 * 10
    assert calc.training_memory_bytes("llama-7b") == 16 * 6_738_415_616
    with pytest.raises(ValueError, match="optimizer"):
        calc.training_memory_bytes(10, optimizer="lion")
    with pytest.raises(ValueError, match="dtype"):
        calc.training_memory_bytes(10, dtype="fp12")
    with pytest.raises(ValueError, match="n_trainable"):
        calc.training_memory_bytes(10, n_trainable=11)
    with pytest.raises(ValueError, match="n_trainable"):
        calc.training_memory_bytes(10, "lora")  # a bare count cannot count LoRA


def test_training_memory_of_a_method_counts_its_trainable_parameters():
    lora = calc.peft_params("llama-7b", "lora", r=8)
    mem = calc.training_memory("llama-7b", "lora", r=8, dtype="bf16")
    assert mem == {"weights": 2 * (6_738_415_616 + lora), "gradients": 2 * lora, "optimizer": 4 * lora,
                   "total": 2 * 6_738_415_616 + 8 * lora}  # frozen weights 2 bytes, each LoRA parameter 2 + 2 + 4
    with_acts = calc.training_memory("llama-7b", "lora", r=8, dtype="bf16", batch_size=1, seq_len=512)
    acts = calc.activation_memory_bytes("llama-7b", 1, 512, 2)
    assert with_acts["activations (estimate)"] == acts > 0
    assert with_acts["total"] == mem["total"] + acts
    with pytest.raises(ValueError, match="architecture"):
        calc.training_memory(1000, batch_size=2, seq_len=4)


def test_activations_reduce_to_korthikanti():
    # GPT layout, 16-bit activations with 1-byte dropout masks: s b h (34 + 5 a s / h) per layer
    a = calc.Arch("toy-gpt", d_model=64, n_layers=3, d_ff=256, n_heads=4, n_kv_heads=4, vocab=100,
                  family="gpt", n_positions=32)
    s, b, h = 16, 2, 64
    expected = 3 * s * b * h * (34 + 5 * 4 * s / h)
    assert calc.activation_memory_bytes(a, b, s, bytes_per_value=2) == pytest.approx(expected)
    mem = calc.training_memory(a, batch_size=b, seq_len=s)
    acts = mem["activations (estimate)"]
    assert acts > 0 and mem["total"] == pytest.approx(16 * calc.total_params(a) + acts)


def test_other_methods_follow_their_formulas():
    a = calc.ARCHS["smollm2-135m"]
    assert calc.peft_params(a, "prompt_tuning", n_tokens=20) == 20 * 576
    assert calc.peft_params(a, "prefix_tuning", n_tokens=10) == 2 * 30 * 10 * 192  # GQA: 3 kv heads x 64
    width = 2 * 30 * 192  # the reparameterization MLP: Embedding(10, kv_dim) -> kv_dim x 512 -> 512 x (2 L kv_dim)
    assert calc.peft_params(a, "prefix_tuning", n_tokens=10, reparam=True, hidden=512) == (
        10 * 192 + 192 * 512 + 512 + 512 * width + width)
    # Houlsby et al.: 2md + d + m per adapter, two per layer; Pfeiffer and parallel one per layer
    assert calc.peft_params(a, "adapters", size=16) == 2 * 30 * (2 * 16 * 576 + 576 + 16)
    assert calc.peft_params("minilm", "adapters", size=16, placement="pfeiffer") == 6 * (2 * 16 * 384 + 384 + 16)
    assert calc.peft_params("minilm", "adapters", size=16, placement="parallel") == 6 * (2 * 16 * 384 + 384 + 16)
    assert calc.peft_params(a, "llama_adapter", n_tokens=10) == 30 * (10 * 576 + 9)
    assert calc.peft_params(a, "llama_adapter", n_tokens=10, n_layers=4) == 4 * (10 * 576 + 9)


def test_qlora_trains_lora_on_every_block_linear_over_a_4_bit_base():
    a = calc.ARCHS["smollm2-135m"]
    assert calc.peft_params(a, "qlora", r=8) == calc.lora_params(a, 8, calc.LINEARS)  # default: all seven
    assert calc.peft_params("minilm", "qlora", r=8) == calc.lora_params("minilm", 8, ("q", "k", "v", "o", "up", "down"))
    assert calc.peft_params(a, "qlora", r=4, targets=("q", "v"), double_quant=False) == calc.peft_params(a, "lora", r=4)
    assert calc.bits_per_parameter(False) == 4.5 and round(calc.bits_per_parameter(True), 3) == 4.127
    # one 64 x 64 matrix: 2048 bytes of codes, 64 absmax: 256 bytes, or 64 + 4 (one 256-block) + 4 (the mean)
    assert calc.quantized_matrix_bytes(4096, False) == 2048 + 256 and calc.quantized_matrix_bytes(4096) == 2048 + 72
    linear = 30 * sum(i * o for i, o in calc.block_linears(a).values())
    assert calc.quantized_bytes(a, double_quant=False) == 4 * (calc.total_params(a) - linear) + 4.5 / 8 * linear
    mem = calc.training_memory(a, "qlora", r=8)
    assert mem["weights"] == calc.quantized_bytes(a) + 4 * calc.peft_params(a, "qlora", r=8)
    assert mem["gradients"] == 4 * calc.peft_params(a, "qlora", r=8)
    # the paper's headline: LLaMA 65B finetuned on one 48 GB GPU (r = 64 on every linear layer, bf16)
    assert calc.training_memory("llama-65b", "qlora", r=64, dtype="bf16")["total"] < 48e9
    assert calc.training_memory("llama-65b", "lora", r=64, targets=calc.LINEARS, dtype="bf16")["total"] > 130e9
    with pytest.raises(ValueError, match="qlora needs an architecture"):
        calc.training_memory(10_000, "qlora", n_trainable=10)


def test_papers_counts():
    # LLaMA-Adapter (Zhang et al. 2023): 1.2M on LLaMA-7B, prompts of 10 tokens in the top 30 layers
    assert calc.peft_params("llama-7b", "llama_adapter", n_tokens=10, n_layers=30) == 30 * (10 * 4096 + 32)
    assert round(calc.peft_params("llama-7b", "llama_adapter", n_tokens=10, n_layers=30) / 1e6, 1) == 1.2
    # LoRA paper, Tables 2 and 3: RoBERTa base 0.3M, large 0.8M (r=8, Wq Wv); GPT-2 M 0.35M (r=4)
    assert calc.peft_params("roberta-base", "lora", r=8) == 294_912
    assert calc.peft_params("roberta-large", "lora", r=8) == 786_432
    assert calc.peft_params("gpt2-medium", "lora", r=4) == 393_216
    # the same paper's full counts: 125M, 355M, 354.92M
    assert round(calc.total_params("roberta-base") / 1e6) == 125
    assert round(calc.total_params("roberta-large") / 1e6) == 355
    assert round(calc.total_params("gpt2-medium") / 1e6) == 355


def test_presets_equal_transformers_models_built_on_the_meta_device():
    """Counted by an implementation nobody here wrote: transformers' own model classes (no weights)."""
    import torch
    import transformers as T

    def n(model):
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        models = {
            "roberta-base": T.RobertaModel(T.RobertaConfig(
                vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1)),
            "gpt2-medium": T.GPT2LMHeadModel(T.GPT2Config(n_embd=1024, n_layer=24, n_head=16, n_positions=1024)),
            "llama-13b": T.LlamaForCausalLM(T.LlamaConfig(
                hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, num_attention_heads=40,
                vocab_size=32000)),
        }
    for name, model in models.items():
        assert calc.total_params(name) == n(model), name


def test_architecture_from_a_dict():
    dims = {"layers": 30, "hidden": 576, "heads": 9, "kv_heads": 3, "ffn": 1536, "vocab": 49152}
    assert calc.total_params(dims) == calc.total_params("smollm2-135m")
    assert calc.peft_params(dims, "lora", r=8) == calc.peft_params("smollm2-135m", "lora", r=8)
    assert calc.get_arch({**dims, "kv_heads": 9}).kv_dim == 576
    with pytest.raises(ValueError, match="vocab"):
        calc.get_arch({"layers": 2, "hidden": 8, "heads": 2, "ffn": 16})
    with pytest.raises(ValueError, match="unknown"):
        calc.get_arch({**dims, "hidden_size": 576})


def test_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="lora"):
        calc.peft_params("minilm", "loar")
    with pytest.raises(ValueError, match="gate"):  # only llama has gate_proj
        calc.peft_params("smollm2-135m", "lora", targets=("qq",))
    with pytest.raises(ValueError, match="valid: q, k, v, o, up, down"):
        calc.peft_params("minilm", "lora", targets=("gate",))
    with pytest.raises(ValueError, match="targets"):
        calc.peft_params("minilm", "lora", rank=8)
    with pytest.raises(ValueError, match="presets"):
        calc.get_arch("gpt-5")
    with pytest.raises(ValueError, match="houlsby, pfeiffer, parallel"):
        calc.peft_params("minilm", "adapters", placement="after")
    with pytest.raises(ValueError, match="between 1 and 6"):
        calc.peft_params("minilm", "llama_adapter", n_layers=7)


def _lora_count_from_modules(model: nn.Module, targets, r: int) -> int:
    found = params.find_modules(model, targets)
    return sum(r * (m.in_features + m.out_features) for m in found.values())


@pytest.mark.real_models
def test_presets_match_our_minilm(minilm):
    model, _ = minilm
    a, c = calc.ARCHS["minilm"], model.config
    assert (a.d_model, a.n_layers, a.d_ff, a.n_heads, a.vocab, a.n_positions) == (
        c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.vocab_size,
        c.max_position_embeddings)
    assert params.count_parameters(model)[1] == calc.total_params(a) == 22_713_216
    assert sum(p.numel() for p in model.encoder.layer[-1].parameters()) == calc.block_params(a)
    assert _lora_count_from_modules(model, ["query", "value"], 8) == calc.peft_params(a, "lora", r=8)


@pytest.mark.real_models
def test_presets_match_our_smollm2(smollm2):
    model, _ = smollm2
    a, c = calc.ARCHS["smollm2-135m"], model.config
    assert (a.d_model, a.n_layers, a.d_ff, a.n_heads, a.n_kv_heads, a.vocab, a.tied_embeddings) == (
        c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
        c.vocab_size, c.tie_word_embeddings)
    assert params.count_parameters(model)[1] == calc.total_params(a) == 134_515_008  # tied head counted once
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == calc.block_params(a)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert _lora_count_from_modules(model, targets, 4) == calc.peft_params(a, "lora", r=4, targets=targets)


def test_minilm_goes_by_both_names():
    assert calc.get_arch("minilm-l6") is calc.get_arch("minilm")


METHOD_CONFIGS = [
    ("lora", {"r": 4, "targets": ("q", "v")}),
    ("prompt_tuning", {"n_tokens": 20}),
    ("prefix_tuning", {"n_tokens": 10, "reparam": False}),
    ("prefix_tuning", {"n_tokens": 10, "reparam": True, "hidden": 64}),
    ("adapters", {"size": 16, "placement": "houlsby"}),
    ("adapters", {"size": 16, "placement": "pfeiffer"}),
    ("adapters", {"size": 8, "placement": "parallel"}),
    ("llama_adapter", {"n_tokens": 10, "n_layers": 4}),
    ("dora", {"r": 4, "targets": ("q", "v")}),
    ("ia3", {"targets": ("k", "v", "down"), "feedforward": ("down",)}),
    ("qlora", {"r": 4, "targets": ("q", "v")}),
]
NAMES = {"llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "down": "down_proj"},
         "bert": {"q": "query", "k": "key", "v": "value", "down": "output.dense"}}


def _apply(model, method, h, family):
    """pefttutor's own `apply` for a calculator method and hyperparameters."""
    from pefttutor import quantized
    from pefttutor.methods import adapters, dora, ia3, llama_adapter, lora, prefix_tuning, prompt_tuning, qlora

    names = NAMES[family]
    if method == "qlora":  # on the base with its targets in 4 bits
        targets = [names[t] for t in h["targets"]]
        return qlora.apply(quantized.quantize_model(model, targets), targets, r=h["r"])
    if method in ("lora", "dora"):
        return {"lora": lora, "dora": dora}[method].apply(model, [names[t] for t in h["targets"]], r=h["r"])
    if method == "ia3":  # on Bert, `output.dense` names the attention's output projection too (as in peft)
        return ia3.apply(model, [names[t] for t in h["targets"]], [names[t] for t in h["feedforward"]])
    if method == "prompt_tuning":
        return prompt_tuning.apply(model, h["n_tokens"])
    if method == "prefix_tuning":
        return prefix_tuning.apply(model, h["n_tokens"], reparam=h["reparam"], **({"hidden": h["hidden"]} if h["reparam"] else {}))
    if method == "adapters":
        return adapters.apply(model, h["size"], placement=h["placement"])
    return llama_adapter.apply(model, n_tokens=h["n_tokens"], n_layers=h["n_layers"])


@pytest.mark.real_models
@pytest.mark.parametrize("which", ["minilm", "smollm2-135m"])
def test_calculator_equals_what_apply_trains_on_our_models(which, minilm, smollm2):
    import copy

    base, family = (minilm[0], "bert") if which == "minilm" else (smollm2[0], "llama")
    checked = 0
    for method, h in METHOD_CONFIGS:
        if method == "llama_adapter" and family != "llama":
            continue
        model = _apply(copy.deepcopy(base), method, h, family)
        if method == "ia3" and family == "bert":
            h = {"targets": ("k", "v", "o", "down"), "feedforward": ("o", "down")}
        assert params.count_parameters(model)[0] == calc.peft_params(which, method, **h), (method, h)
        checked += 1
    assert checked == (11 if family == "llama" else 10)


@pytest.mark.real_models
@pytest.mark.parametrize("double_quant", [True, False])
def test_calculator_equals_the_bytes_of_a_4_bit_smollm2(smollm2, double_quant):
    """The stored bytes of SmolLM2 with every block linear in 4 bits, counted from its tensors
    (the tied LM head once), and what QLoRA on it trains."""
    import copy

    from pefttutor import quantized
    from pefttutor.methods import qlora

    model = quantized.quantize_model(copy.deepcopy(smollm2[0]), double_quant=double_quant)
    seen, stored = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            stored += t.numel() * t.element_size()
    assert stored == calc.quantized_bytes("smollm2-135m", double_quant=double_quant)
    four_bit = sum(m.stored_bytes() for m in quantized.layers(model).values())
    n = sum(m.in_features * m.out_features for m in quantized.layers(model).values())
    assert abs(8 * four_bit / n - calc.bits_per_parameter(double_quant)) < 2e-3
    qlora.apply(model, r=4)
    assert params.count_parameters(model)[0] == calc.peft_params("smollm2-135m", "qlora", r=4)


def test_mixed_precision_counts_16_bytes_per_trained_and_2_per_frozen_parameter():
    n = calc.total_params("gpt3-175b")
    t = calc.peft_params("gpt3-175b", "lora", r=4, targets=("q", "v"))
    assert calc.mixed_precision_bytes("gpt3-175b") == 16 * n == calc.training_memory_bytes("gpt3-175b")  # = fp32
    assert calc.mixed_precision_bytes("gpt3-175b", "lora", r=4, targets=("q", "v")) == 2 * n + 16 * t
    assert calc.mixed_precision_bytes("gpt3-175b") > 2 * calc.training_memory_bytes("gpt3-175b", dtype="bf16") - 1
