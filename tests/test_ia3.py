"""IA3: the formula, exact start and merge, and the peer test against HF peft's IA3."""

import copy

import peft
import pytest
import torch
from torch import nn

from pefttutor import calculator, interop, params
from pefttutor.methods import ia3
from pefttutor.methods.ia3 import IA3Linear
from pefttutor.models import Bert, Llama
from tiny_models import through_peft, tiny_hf

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft calls it

# peft's defaults for the two families (TRANSFORMERS_MODELS_TO_IA3_*_MAPPING)
TARGETS = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
           "bert": (["key", "value", "output.dense"], ["output.dense"])}


@pytest.mark.parametrize("feedforward", [False, True])
def test_forward_is_the_formula_and_merge_folds_it(feedforward):
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    m = IA3Linear(copy.deepcopy(base), feedforward=feedforward).eval()
    x = torch.randn(3, 6)
    torch.testing.assert_close(m(x), base(x), rtol=0, atol=0)  # l = 1: exactly the base layer
    with torch.no_grad():
        m.ia3_l.normal_()
    l = m.ia3_l.flatten()
    expected = base(x * l) if feedforward else base(x) * l
    torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-6)
    m.merge()
    torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-5)
    m.unmerge()
    torch.testing.assert_close(m.base.weight, base.weight, rtol=1e-5, atol=1e-6)
    m.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        m.train()(x)


def test_trainable_count_equals_the_calculator_on_smollm2_shapes():
    from pefttutor.models.llama import LlamaConfig

    model = ia3.apply(Llama(LlamaConfig(vocab_size=16)), *TARGETS["llama"])  # SmolLM2's layout
    assert params.count_parameters(model)[0] == calculator.peft_params("smollm2-135m", "ia3") == 57_600


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_same_outputs_gradients_and_merge_as_peft(family):
    hf = tiny_hf(family)
    ours = (Llama if family == "llama" else Bert).from_hf(hf).eval()
    targets, feedforward = TARGETS[family]
    ia3.apply(ours, targets, feedforward)
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.IA3Config(target_modules=targets,
                                                                   feedforward_modules=feedforward)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ia3.trainable(ours).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    mine = ia3.adapter_state_dict(ours)
    peft.set_peft_model_state_dict(theirs, {f"base_model.model.{k}": v.clone() for k, v in mine.items()})
    assert {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()} == {
        f"base_model.model.{k}": tuple(v.shape) for k, v in mine.items()}  # the same names and shapes
    ids = torch.randint(0, 64, (2, 7))
    out = lambda m: m(input_ids=ids).logits if family == "llama" else m(input_ids=ids).last_hidden_state  # noqa: E731
    torch.testing.assert_close(ours(ids), out(theirs), rtol=0, atol=1e-5)
    ours(ids).square().mean().backward()
    out(theirs).square().mean().backward()
    theirs_grads = {n.replace(".default", "").removeprefix("base_model.model."): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ia3.trainable(ours).items():
        torch.testing.assert_close(p.grad, theirs_grads[name], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        ia3.merge(ours)
        torch.testing.assert_close(ours(ids), out(theirs.merge_and_unload()), rtol=0, atol=1e-5)


def test_every_field_peft_writes_is_known():
    written = peft.IA3Config(target_modules=["k_proj"]).to_dict()
    assert set(written) == set(interop.IA3_FIELDS)


@pytest.mark.parametrize("direction", ["export", "import"])
def test_interop_with_peft_both_ways(direction, tmp_path):
    """Our IA3 adapter as a peft folder (peft_type IA3) gives peft our outputs, and peft's loads into ours."""
    targets, feedforward = TARGETS["llama"]
    config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
    ours, theirs, hf = through_peft(direction, ia3.METHOD, config, tmp_path, scale=0.3, targets=targets,
                                    feedforward=feedforward)
    assert ia3.get_config(ours).feedforward == ("down_proj",)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
        assert (ours(ids) - hf(input_ids=ids).logits).abs().max() > 1e-3
