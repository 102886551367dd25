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
    assert calc.training_memory_bytes(1_000, bytes_per_param=2) == 8_000
    # PEFT: frozen weights at 4 bytes, 16 bytes only for the trainable ones
    assert calc.training_memory_bytes(1_000, n_trainable=10) == 4 * 990 + 16 * 10
    full = calc.full_finetune_memory("llama-7b")
    assert full["total"] == 16 * 6_738_415_616 and full["activations"] == 0
    with pytest.raises(ValueError, match="optimizer"):
        calc.training_memory_bytes(10, optimizer="lion")
    with pytest.raises(ValueError, match="n_trainable"):
        calc.training_memory_bytes(10, n_trainable=11)


def test_activations_reduce_to_korthikanti():
    # GPT layout, 16-bit activations with 1-byte dropout masks: s b h (34 + 5 a s / h) per layer
    a = calc.Arch("toy-gpt", d_model=64, n_layers=3, d_ff=256, n_heads=4, n_kv_heads=4, vocab=100,
                  family="gpt", n_positions=32)
    s, b, h = 16, 2, 64
    expected = 3 * s * b * h * (34 + 5 * 4 * s / h)
    assert calc.activation_memory_bytes(a, b, s, bytes_per_value=2) == pytest.approx(expected)
    mem = calc.full_finetune_memory(a, batch_size=b, seq_len=s)
    assert mem["activations"] > 0 and mem["total"] == pytest.approx(16 * calc.total_params(a) + mem["activations"])
    with pytest.raises(ValueError, match="Arch"):
        calc.full_finetune_memory(1000, batch_size=2, seq_len=4)


def test_other_methods_follow_their_formulas():
    a = calc.ARCHS["smollm2-135m"]
    assert calc.peft_params(a, "prompt", n_tokens=20) == 20 * 576
    assert calc.peft_params(a, "prefix", n_tokens=10) == 2 * 30 * 10 * 192  # GQA: 3 kv heads x 64
    assert calc.peft_params(a, "adapter", bottleneck=16) == 2 * 30 * (2 * 16 * 576 + 576 + 16)
    assert calc.peft_params("minilm", "adapter", bottleneck=16, per_layer=1) == 6 * (2 * 16 * 384 + 384 + 16)


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
