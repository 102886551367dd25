import functools
import importlib
import inspect
import pkgutil

import pytest
import torch

from pefttutor.exercises import Exercise, close_to, exact_count
from tiny_models import ByteTokenizer, reversed_demos_exercise, tiny_bert, tiny_llama, two_lora_adapters


def make():
    return Exercise("add", lambda a: a == 4, hint="2 + 2", solution="answer = 4")


def test_unattempted_does_not_fail(capsys):
    assert make().check(...) is None and make().check(None) is None
    assert "not attempted" in capsys.readouterr().out


def test_right_and_wrong(capsys):
    assert make().check(4) is True
    assert "correct" in capsys.readouterr().out
    assert make().check(5) is False
    assert "not quite" in capsys.readouterr().out


def test_checker_messages_and_errors(capsys):
    def checker(a):
        assert a > 0, "must be positive"
        return True

    ex = Exercise("pos", checker, hint="h", solution="s")
    assert ex.check(-1) is False and "must be positive" in capsys.readouterr().out
    assert ex.check("x") is False and "TypeError" in capsys.readouterr().out
    ex.hint()
    ex.solution()
    out = capsys.readouterr().out
    assert "h" in out and "s" in out


def test_close_to():
    ex = Exercise("pi", close_to(3.14159, rel=1e-3), hint="", solution="")
    assert ex.check(3.1416) is True
    assert ex.check(3.2) is False


def test_notebook00_checkers_right_and_wrong(capsys):
    from pefttutor.exercises import models_and_data as nb00
    from pefttutor.models import Llama, LlamaConfig

    cfg = LlamaConfig()
    assert nb00.llama_block_params(cfg) == 3_540_096
    tiny = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    real = sum(p.numel() for p in Llama(tiny).model.layers[0].parameters())
    assert nb00.llama_block_params(tiny) == real  # the formula, checked against a real block
    ex = nb00.block_params(cfg)
    assert ex.check(2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576) is True
    assert ex.check(2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) is False
    share = nb00.embedding_share(134_515_008)
    assert share.check(49152 * 576 / 134_515_008) is True
    assert share.check(0.5) is False
    assert share.check(...) is None


def test_notebook01_checkers_right_and_wrong(capsys):
    from pefttutor.exercises import introduction as nb01
    from pefttutor.models import Bert, BertConfig

    assert nb01.adam_memory_13b().check(208) is True
    assert nb01.adam_memory_13b().check(52) is False
    assert nb01.fits("lora") and not nb01.fits("full")
    assert nb01.what_fits_24gb().check("lora") is True
    assert nb01.what_fits_24gb().check("full") is False
    block = sum(p.numel() for p in Bert(BertConfig(hidden_size=384, num_hidden_layers=1, num_attention_heads=12,
                                                   intermediate_size=1536)).encoder.layer[0].parameters())
    ex = nb01.minilm_block_params(block)
    assert ex.check(4 * (384 * 384 + 384) + (384 * 1536 + 1536) + (1536 * 384 + 384) + 2 * 2 * 384) is True
    assert ex.check(4 * 384 * 384 + 2 * 384 * 1536) is False


def test_conclusion_exercises(capsys):
    from pefttutor.exercises import conclusion as c

    assert c.llama_adapter_7b.check(30 * (10 * 4096 + 32)) is True
    assert c.llama_adapter_7b.check(30 * 10 * 4096) is False
    rows = [{"method": "full", "gap": None, "file_bytes": 90e6},
            {"method": "lora-qv", "gap": (-0.7, 0.6), "file_bytes": 300e3},
            {"method": "ia3", "gap": (-1.3, 0.6), "file_bytes": 70e3},  # beyond 2 standard errors: worse
            {"method": "head", "gap": (-8.8, 0.9), "file_bytes": 5e3}]
    ex = c.smallest_close_to_full(rows)
    assert ex.check("lora-qv") is True and ex.check("head") is False and ex.check("ia3") is False
    assert ex.check(3) is False  # a wrong type is an answer, and wrong
    assert c.largest_fitting_rank(budget_gb=131) == 0 or c.largest_fitting_rank(budget_gb=131) < 30
    r = c.largest_fitting_rank()
    assert c.lora_65b_rank.check(r) is True and c.lora_65b_rank.check(r + 1) is False
    assert c.lora_65b_rank.check(None) is None
    assert "not attempted" in capsys.readouterr().out


def test_production_checkers_right_and_wrong(capsys):
    from pefttutor import combine
    from pefttutor.exercises import production as nb08

    assert nb08.llama7b_allreduce().check(32 * 2 * 8 * (4096 + 4096) * 4) is True
    assert nb08.llama7b_allreduce().check(32 * 2 * 8 * (4096 + 4096)) is False  # values, not bytes
    assert nb08.llama7b_ring().check(2 * 7 * 16_777_216 // 8) is True
    assert nb08.llama7b_ring().check(16_777_216) is False
    assert nb08.ring_bytes_sent(100, 2) == 100 and nb08.ring_bytes_sent(800, 8) == 1400
    adapters = two_lora_adapters()
    ex = nb08.smallest_svd_rank(adapters, [1.0, 1.0], tolerance=0.01)
    cat = combine.delta_weights(*combine.weighted_adapter(adapters, [1.0, 1.0], "cat"))

    def error(k):  # the experiment as the reader runs it
        svd = combine.delta_weights(*combine.weighted_adapter(adapters, [1.0, 1.0], "svd", svd_rank=k))
        return (sum(float((svd[p] - cat[p]).square().sum()) for p in cat)
                / sum(float(c.square().sum()) for c in cat.values())) ** 0.5

    k = next(k for k in range(1, 5) if error(k) <= 0.01)
    assert k == 4  # two random rank-2 updates: their sum needs all 4 directions
    assert ex.check(k) is True
    assert ex.check(k - 1) is False and "gives" in capsys.readouterr().out
    assert ex.check(k + 1) is False and "a smaller one is too" in capsys.readouterr().out


def test_reversed_demonstrations_experiment_right_and_wrong(smollm2, capsys):
    from pefttutor import data, icl, metrics

    model, tok = smollm2
    label_ids = data.verbalizer_token_ids(tok)
    ex, tweets, demos = reversed_demos_exercise(model, tok, label_ids)
    gold = [t["label"] for t in tweets]

    def accuracy(d):  # the learner's experiment, done independently of the checker
        prompts = [data.tweet_prompt(t["text"], d) for t in tweets]
        return metrics.accuracy(icl.label_scores_uncached(model, tok, prompts, label_ids).argmax(-1).tolist(), gold)

    reverse, forward = accuracy(demos[::-1]), accuracy(demos)
    assert ex.check(round(reverse, 3)) is True and "reversed" in capsys.readouterr().out
    if abs(forward - reverse) > 1e-3:
        assert ex.check(forward) is False and "original order" in capsys.readouterr().out
    assert ex.check(reverse + 0.1) is False
    assert ex.check("0.5") is False and "expected a number, got str" in capsys.readouterr().out


def tiny_classifier_and_batches():
    """Notebook 04's step-0 experiment in miniature: a tiny Bert classifier and two labelled batches."""
    import torch

    from pefttutor.models import BertClassifier

    classifier = BertClassifier(tiny_bert(), num_classes=3, pooling="mean").eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1, 64, (4, 7), generator=g), "attention_mask": torch.ones(4, 7, dtype=torch.long),
                "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(2)]
    return classifier, batches


def test_adapters_step0_experiment_right_and_wrong(capsys):
    import copy
    import statistics

    import torch

    from pefttutor import config, train
    from pefttutor.exercises import adapters as nb04
    from pefttutor.methods import adapters

    classifier, batches = tiny_classifier_and_batches()

    @torch.no_grad()
    def val_loss(model):  # the notebook's val_loss, done independently of the checker
        model.eval()
        return statistics.fmean(train.classification_loss(model, b).item() for b in batches)

    def experiment(size, sigma=2.0):  # the reader's experiment, seeded as the notebook seeds it
        config.seed_everything(0)
        return val_loss(adapters.apply(copy.deepcopy(classifier), size=size, sigma=sigma))

    ex = nb04.step0_loss(classifier, batches, size=2, sigma=2.0, compare_size=16)
    right, wide, none = experiment(2), experiment(16), val_loss(classifier)
    assert min(abs(right - wide), abs(right - none), abs(wide - none)) > 2e-3  # three different answers
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert ex.check(round(right, 4)) is True and "m=2" in capsys.readouterr().out
    assert torch.equal(torch.rand(3), expected)  # the checker leaves the global RNG alone
    assert ex.check(wide) is False and "m=16" in capsys.readouterr().out
    assert ex.check(none) is False and "without adapters" in capsys.readouterr().out
    assert ex.check(right + 0.1) is False and "seed_everything" in capsys.readouterr().out
    assert ex.check("0.9") is False and "expected a number, got str" in capsys.readouterr().out
    assert not classifier.training and has_no_adapters(classifier)


def has_no_adapters(model):
    """The checker works on copies: the model passed in still has no adapters."""
    from pefttutor.methods import adapters

    return not adapters.adapter_layers(model)


def tiny_trained_llama_adapter():
    """Notebook 04's closed-gates experiment in miniature: a tiny Llama with an adapter whose gates are
    open (as after training), and a batch scored on its last tokens only."""
    import torch

    from pefttutor.methods import llama_adapter

    torch.manual_seed(0)
    model = llama_adapter.apply(tiny_llama(), n_tokens=3)
    with torch.no_grad():
        for a in llama_adapter.adapters(model).values():
            a.adaption_gate.normal_(std=0.5)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 64, (2, 6), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # the "prompt" is not scored
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_llama_adapter_closed_gates_experiment_right_and_wrong(capsys):
    import copy

    import torch

    from pefttutor import train
    from pefttutor.exercises import llama_adapter as nb04
    from pefttutor.methods import llama_adapter

    model, batch = tiny_trained_llama_adapter()
    before = llama_adapter.gates(model)

    def loss_with_closed(layers):  # the reader's experiment, done independently of the checker
        closed = copy.deepcopy(model)
        with torch.no_grad():
            for i, a in enumerate(llama_adapter.adapters(closed).values()):
                if i in layers:
                    a.adaption_gate.zero_()
            return train.causal_lm_loss(closed, batch).item()

    ex = nb04.closed_gates_loss(model, batch, layers=[1])
    right, opened, base = loss_with_closed([1]), loss_with_closed([]), loss_with_closed([0, 1])
    assert min(abs(right - opened), abs(right - base)) > 2e-3  # three different answers
    with torch.no_grad():  # a reader who closes the gates in place before checking does not move the answer
        for a in llama_adapter.adapters(model).values():
            a.adaption_gate.zero_()
    assert ex.check(round(right, 4)) is True and "layers 1-1 closed" in capsys.readouterr().out
    assert torch.equal(llama_adapter.gates(model), torch.zeros_like(before))  # the model's gates are put back
    assert ex.check(opened) is False and "every gate as trained" in capsys.readouterr().out
    assert ex.check(base) is False and "the base model" in capsys.readouterr().out
    assert ex.check(right + 0.1) is False and "causal_lm_loss" in capsys.readouterr().out
    assert ex.check([right]) is False and "expected a number, got list" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="layers must be in"):
        nb04.closed_gates_loss(model, batch, layers=[2])


def tiny_prefixed_llama_and_ids():
    """A tiny Llama with a random prefix (4 layers) and one input of 16 byte tokens, for notebook 03's experiment."""
    from pefttutor.methods import prefix_tuning

    model = prefix_tuning.apply(tiny_llama(num_hidden_layers=4), n_tokens=3, reparam=False)
    return model, torch.tensor([ByteTokenizer()("a prefix steers")["input_ids"]])


def test_prefix_attention_layer_experiment_right_and_wrong(capsys):
    from pefttutor import widgets
    from pefttutor.exercises import prefix

    model, ids = tiny_prefixed_llama_and_ids()
    ex = prefix.prefix_attention_layer(model, ids)

    class Tokenizer:  # what the viewer needs: the same ids as a tensor, and names for the tokens
        def __call__(self, text, return_tensors=None):
            return {"input_ids": ids}

        def decode(self, token_ids):
            return str(token_ids[0])

    # the learner's experiment, done independently of the checker: read the attention viewer's state
    shares = widgets.prefix_attention_viewer(model, Tokenizer(), {"the example": "..."}).state["prefix"].mean(-1)
    best, low = int(shares.argmax()), int(shares.argmin())
    assert ex.check(best) is True and "of its attention" in capsys.readouterr().out
    assert ex.check(low) is False and "the least" in capsys.readouterr().out
    other = next(i for i in range(4) if i not in (best, low))
    assert ex.check(other) is False and "another layer gives it more" in capsys.readouterr().out
    assert ex.check(4) is False and "numbered 0 to 3" in capsys.readouterr().out
    assert ex.check(-1) is False and "numbered 0 to 3" in capsys.readouterr().out
    assert ex.check(2.0) is False and "expected an int, got float" in capsys.readouterr().out
    assert ex.check(...) is None


def tiny_llama_and_val_loss():
    """Notebook 07's experiment in miniature: a tiny Llama (its block matrices scaled up 16x, so that 4-bit
    rounding moves the loss by more than the checker's tolerance) and a val_loss on one batch."""
    import torch

    from pefttutor import train

    model = tiny_llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(16)
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    @torch.no_grad()
    def val_loss(m):
        return train.causal_lm_loss(m.eval(), batch).item()

    return model, val_loss


@functools.cache
def every_exercise():
    """Each notebook's exercises, built as the notebooks build them (stand-ins for what they measure),
    with the kind of answer each takes."""
    from pefttutor.exercises import (adapters, beyond_lora, conclusion, introduction, llama_adapter, lora, models_and_data,
                                     prefix, production, prompts)

    rows = [{"method": "full", "gap": None, "file_bytes": 90e6}, {"method": "lora-qv", "gap": (-0.7, 0.6), "file_bytes": 3e5}]
    count, number, name, function = "an int", "a number", "a str", "a function"
    return {
        "models_and_data.block_params": (models_and_data.block_params(), count),
        "models_and_data.embedding_share": (models_and_data.embedding_share(134_515_008), number),
        "introduction.adam_memory_13b": (introduction.adam_memory_13b(), number),
        "introduction.what_fits_24gb": (introduction.what_fits_24gb(), name),
        "introduction.minilm_block_params": (introduction.minilm_block_params(1_774_464), count),
        "prompts.soft_prompt_params": (prompts.soft_prompt_params(), count),
        "prompts.extend_mask": (prompts.extend_mask(), function),
        "prompts.argmax_gradient": (prompts.argmax_gradient(), name),
        "prompts.relaxed_token": (prompts.relaxed_token(), function),
        "prompts.reversed_demonstrations": (reversed_demos_exercise(tiny_llama(), ByteTokenizer(), [3, 4, 5])[0], number),
        "prefix.smollm2_params": (prefix.smollm2_params(), count),
        "prefix.smollm2_mlp_params": (prefix.smollm2_mlp_params(), count),
        "prefix.layer_prefix": (prefix.layer_prefix(), function),
        "prefix.prefix_attention_layer": (prefix.prefix_attention_layer(*tiny_prefixed_llama_and_ids()), count),
        "adapters.bert_large_params": (adapters.bert_large_params(), count),
        "adapters.forward": (adapters.forward(), function),
        "adapters.zero_init": (adapters.zero_init(), function),
        "adapters.step0_loss": (adapters.step0_loss(*tiny_classifier_and_batches(), size=2, compare_size=16), number),
        "lora.gpt3_params": (lora.gpt3_params(), count),
        "lora.smollm2_params": (lora.smollm2_params(), count),
        "lora.forward": (lora.forward(), function),
        "lora.merge": (lora.merge(), function),
        "lora.update_overlap": (lora.update_overlap(*trained_lora_pair()), number),
        "llama_adapter.llama7b_params": (llama_adapter.llama7b_params(), count),
        "llama_adapter.smollm2_params": (llama_adapter.smollm2_params(), count),
        "llama_adapter.first_step": (llama_adapter.first_step(), name),
        "llama_adapter.closed_gates_loss": (llama_adapter.closed_gates_loss(*tiny_trained_llama_adapter(), layers=[1]),
                                            number),
        "conclusion.llama_adapter_7b": (conclusion.llama_adapter_7b, count),
        "conclusion.smallest_close_to_full": (conclusion.smallest_close_to_full(rows), name),
        "conclusion.lora_65b_rank": (conclusion.lora_65b_rank, count),
        "production.llama7b_allreduce": (production.llama7b_allreduce(), count),
        "production.llama7b_ring": (production.llama7b_ring(), count),
        "production.smallest_svd_rank": (production.smallest_svd_rank(two_lora_adapters(), [1.0, 1.0]), count),
        "beyond_lora.bits_with_double_quant": (beyond_lora.bits_with_double_quant(), number),
        "beyond_lora.dora_extra_params": (beyond_lora.dora_extra_params(), count),
        "beyond_lora.mlp_only_loss": (beyond_lora.mlp_only_loss(*tiny_llama_and_val_loss()), number),
    }


def trained_lora_pair():
    """A stand-in for notebook 05's experiment: a "full finetuning" update dW of a 24 x 16 matrix and a LoRA
    layer (r=3) whose update shares some of its directions."""
    from pefttutor.methods.lora import LoRALinear

    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 24), r=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(24, 3, generator=g))
    dW = layer.scaling * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach() + 0.5 * torch.randn(24, 16, generator=g)
    return dW, layer


def test_lora_update_overlap_experiment_right_and_wrong(capsys):
    from pefttutor.exercises import lora

    dW, layer = trained_lora_pair()
    ex = lora.update_overlap(dW, layer)
    dW_lora = (layer.scaling * layer.lora_B.weight @ layer.lora_A.weight).detach().double()
    U = torch.linalg.svd(dW_lora, full_matrices=False)[0][:, :3]  # the reader's way, computed independently
    share = ((U.T @ dW.double()).norm() ** 2 / dW.double().norm() ** 2).item()
    assert 3 / 24 < share < 1
    assert ex.check(round(share, 3)) is True and "random" in capsys.readouterr().out
    own = torch.linalg.svdvals(dW.double()) ** 2
    assert ex.check((own[:3].sum() / own.sum()).item()) is False and "own top directions" in capsys.readouterr().out
    assert ex.check(3 / 24) is False and "random subspace" in capsys.readouterr().out
    assert ex.check(share + 0.01) is False
    assert ex.check("0.5") is False and "expected a number, got str" in capsys.readouterr().out


def test_every_exercise_is_in_the_wrong_type_test():
    import pefttutor.exercises as package

    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for attr, obj in vars(module).items():
            made_here = getattr(obj, "__module__", None) == module.__name__
            if isinstance(obj, Exercise) or made_here and inspect.isfunction(obj) and \
                    inspect.signature(obj).return_annotation in ("Exercise", Exercise):
                found.add(f"{info.name}.{attr}")
    assert found == set(every_exercise())


WRONG_TYPES = {
    "an int": ["1774464", 1774464.0, [1774464], True],
    "a number": ["0.21", [0.21], True],
    "a str": [5, ["lora"], 0.5, True],
    "a function": ["lora_forward", 5, [len]],
}


@pytest.mark.parametrize("name", list(every_exercise()))
def test_a_wrong_type_is_told_its_type_never_a_checker_error(name, capsys):
    ex, kind = every_exercise()[name]
    for answer in WRONG_TYPES[kind]:
        assert ex.check(answer) is False, answer
        out = capsys.readouterr().out
        assert f"expected {kind}, got {type(answer).__name__}" in out and "raised" not in out, out
    assert ex.check(None) is None and "not attempted" in capsys.readouterr().out


def test_a_numpy_count_is_an_int(capsys):
    import numpy as np

    assert Exercise("n", exact_count(5), hint="", solution="").check(np.int64(5)) is True
    assert Exercise("n", exact_count(5), hint="", solution="").check(np.int64(6)) is False
    assert "you have 6" in capsys.readouterr().out


def test_beyond_lora_checkers_right_and_wrong(capsys):
    import copy

    from pefttutor import quantized
    from pefttutor.exercises import beyond_lora as nb07

    ex1 = nb07.bits_with_double_quant()
    assert ex1.check(4 + 8 / 64 + 32 / (64 * 256)) is True and "4.1270" in capsys.readouterr().out
    assert ex1.check(4.5) is False and "without double quantization" in capsys.readouterr().out
    assert ex1.check(4.125) is False and "their own fp32 absmax" in capsys.readouterr().out
    assert ex1.check("4.127") is False and "expected a number, got str" in capsys.readouterr().out
    ex2 = nb07.dora_extra_params("llama-7b", ("q", "v"), r=8)
    assert ex2.check(32 * (4096 + 4096)) is True
    assert ex2.check(32 * (4096 + 4096) + 32 * 2 * 8 * 8192) is False and "DoRA's total" in capsys.readouterr().out
    assert ex2.check(262_144.0) is False and "expected an int, got float" in capsys.readouterr().out
    smol = nb07.dora_extra_params("smollm2-135m", ("q", "k", "v"))  # GQA: k and v have 192 outputs
    assert smol.check(30 * (576 + 192 + 192)) is True
    model, val_loss = tiny_llama_and_val_loss()
    ex3 = nb07.mlp_only_loss(model, val_loss)
    mlp = val_loss(quantized.quantize_model(copy.deepcopy(model), ["gate_proj", "up_proj", "down_proj"]))  # the reader's
    both = val_loss(quantized.quantize_model(copy.deepcopy(model)))
    assert min(abs(mlp - both), abs(mlp - val_loss(model)), abs(both - val_loss(model))) > 1e-3  # told apart
    assert ex3.check(mlp) is True and "4 bits hurt the" in capsys.readouterr().out
    assert ex3.check(both) is False and "every linear in 4 bits" in capsys.readouterr().out
    assert ex3.check(val_loss(model)) is False and "full-precision model" in capsys.readouterr().out
    assert ex3.check(None) is None and not quantized.layers(model)  # the reader's model is never quantized
