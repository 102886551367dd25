import math

import pytest
import torch
from torch import nn

from pefttutor import params, train


def toy_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return [{"x": x[i : i + 16], "labels": y[i : i + 16]} for i in range(0, n, 16)]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 64)
        self.head = nn.Linear(64, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch["x"]), batch["labels"])


def accuracy(model, data):
    def evaluate(m):
        correct = sum((m(b["x"]).argmax(-1) == b["labels"]).sum().item() for b in data)
        return {"accuracy": correct / sum(len(b["labels"]) for b in data)}

    return evaluate


def test_train_learns_only_trainable_and_reports():
    torch.manual_seed(0)
    model = Net()
    params.freeze(model)
    params.unfreeze(model, ["head"])
    body_before = model.body.weight.clone()
    data = toy_data()
    result = train.train(
        model, data, loss_fn, steps=60, lr=1e-1, evaluate=accuracy(model, data), eval_every=20,
        progress=False, device="cpu",
    )
    assert torch.equal(model.body.weight, body_before)  # frozen stays frozen
    assert result.trainable_params == 130 and result.total_params == 706
    assert result.loss_curve[-1] < result.loss_curve[0]
    assert result.metrics["accuracy"] > 0.8
    assert [s for s, _ in result.eval_curve] == [20, 40, 60]
    assert result.steps == 60 and len(result.loss_curve) == 60
    assert result.median_step_s > 0 and result.wall_time_s > 0
    assert math.isfinite(result.peak_memory_mb)
    assert set(result.summary()) >= {"trainable", "trainable %", "accuracy"}


def test_train_is_seeded():
    def run():
        torch.manual_seed(1)
        model = Net()
        return train.train(model, lambda epoch: toy_data(seed=epoch), loss_fn, steps=10,
                           progress=False, device="cpu", seed=5).loss_curve

    assert run() == run()


def test_train_refuses_nothing_trainable_and_empty_data():
    model = params.freeze(Net())
    with pytest.raises(ValueError, match="no trainable parameters"):
        train.train(model, toy_data(), loss_fn, steps=1, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        train.train(Net(), [], loss_fn, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train.train(Net(), toy_data(), loss_fn, steps=0, progress=False)


def test_warmup_cosine_schedule():
    assert train.warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert train.warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert train.warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert train.warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert train.warmup_cosine(100, 100, 10) == pytest.approx(0.0)


@pytest.mark.parametrize("freed_before", [False, True])
def test_peak_memory_sees_a_large_allocation(freed_before):
    # In a fresh process, optionally after holding and freeing small blocks that glibc keeps for
    # reuse: PeakMemory hands them back to the OS on entry, so the new allocation still shows.
    import subprocess
    import sys

    code = (
        "import time, torch\n"
        "from pefttutor.train import PeakMemory\n"
        f"if {freed_before}:\n"
        "    held = [torch.ones(2**14) for _ in range(3000)]\n"  # ~200 MB in 64 KB blocks (heap, not mmap)
        "    del held\n"
        "with PeakMemory(torch.device('cpu')) as mem:\n"
        "    big = [torch.ones(2**14) for _ in range(1000)]\n"  # ~64 MB
        "    time.sleep(0.05)\n"
        "print(mem.peak_mb)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 40 < float(out.stdout) < 200


def test_losses_match_definitions():
    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask, logits_at=None):
            return self.logits if logits_at is None else self.logits[logits_at]

    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, -100, -100]])
    batch = {"input_ids": labels, "attention_mask": torch.ones_like(labels), "labels": labels}
    expected = nn.functional.cross_entropy(
        torch.stack([logits[0, 1], logits[0, 2], logits[1, 0]]), torch.tensor([3, 1, 2])
    )
    assert torch.allclose(train.causal_lm_loss(Fixed(logits), batch), expected)
    cls_logits = torch.randn(3, 2)
    cls_batch = {"input_ids": None, "attention_mask": None, "labels": torch.tensor([0, 1, 1])}
    assert torch.allclose(
        train.classification_loss(Fixed(cls_logits), cls_batch),
        nn.functional.cross_entropy(cls_logits, cls_batch["labels"]),
    )
    preds, gold = train.predict_classes(Fixed(cls_logits), [cls_batch], device="cpu")
    assert preds == cls_logits.argmax(-1).tolist() and gold == [0, 1, 1]


@pytest.mark.parametrize("env, progress, silent", [("1", True, True), ("", True, False), ("", False, True)])
def test_progress_bar_honours_tqdm_disable_even_in_notebooks(monkeypatch, env, progress, silent):
    # tqdm.auto picks tqdm.notebook in Jupyter, which passes disable=False explicitly and so
    # ignores TQDM_DISABLE; train() must pass disable=True itself.
    from tqdm.notebook import tqdm_notebook

    seen = []

    class Bar(tqdm_notebook):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("disable", False))
            kwargs["disable"] = True  # never draw a widget here
            super().__init__(*args, **kwargs)

    monkeypatch.setenv("TQDM_DISABLE", env)
    monkeypatch.setattr(train, "tqdm", Bar)
    torch.manual_seed(0)
    train.train(Net(), toy_data(), loss_fn, steps=2, progress=progress, device="cpu")
    assert seen == [silent]


def test_causal_lm_loss_scores_only_labelled_positions_of_a_real_llama():
    """logits_at: the loss and every gradient equal scoring all positions and ignoring the -100s."""
    from tiny_models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(5, model.config.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    loss = train.causal_lm_loss(model, batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    shifted = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    full = nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).flatten(0, 1), shifted.flatten())
    full_grads = torch.autograd.grad(full, list(model.parameters()))
    assert torch.allclose(loss, full, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, full_grads))
    n = int((shifted != -100).sum())
    assert model(input_ids=ids, attention_mask=mask, logits_at=shifted != -100).shape == (n, model.config.vocab_size)


@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_autocast_trains_and_keeps_weights_fp32(autocast):
    torch.manual_seed(0)
    model = Net()
    data = toy_data()
    result = train.train(model, data, loss_fn, steps=40, lr=1e-1, progress=False, device="cpu", autocast=autocast,
                         evaluate=accuracy(model, data))
    assert result.metrics["accuracy"] > 0.8
    assert all(p.dtype == torch.float32 for p in model.parameters())


def dtype_probe(seen):
    """A loss that records the dtype the model computes in."""
    def probe(model, batch):
        out = model(batch["x"])
        seen.append(out.dtype)
        return nn.functional.cross_entropy(out.float(), batch["labels"])
    return probe


def test_autocast_inside_the_loss_is_bf16():
    seen = []
    probe = dtype_probe(seen)
    train.train(Net(), toy_data(), probe, steps=1, progress=False, device="cpu", autocast="bf16")
    train.train(Net(), toy_data(), probe, steps=1, progress=False, device="cpu")
    assert seen == [torch.bfloat16, torch.float32]


def test_unknown_autocast_lists_the_valid_ones():
    with pytest.raises(ValueError, match="bf16.*auto"):
        train.train(Net(), toy_data(), loss_fn, steps=1, progress=False, device="cpu", autocast="fp8")


@pytest.mark.parametrize("native", [True, False])
def test_auto_autocast_is_bf16_only_where_the_cpu_has_native_kernels(native, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert train.native_bf16("cpu") is native
    assert train.resolve_autocast("cpu", "auto") == ("bf16" if native else None)
    assert train.resolve_autocast("cpu", "bf16") == "bf16" and train.resolve_autocast("cpu", None) is None
    seen = []
    train.train(Net(), toy_data(), dtype_probe(seen), steps=1, progress=False, device="cpu", autocast="auto")
    assert seen == [torch.bfloat16 if native else torch.float32]



def test_should_stop_ends_training_after_an_evaluation():
    torch.manual_seed(0)
    model = Net()
    data = toy_data()
    asked = []

    def stop(curve):
        asked.append(len(curve))
        return len(curve) == 2

    result = train.train(model, data, loss_fn, steps=100, lr=1e-1, evaluate=accuracy(model, data), eval_every=10,
                         should_stop=stop, progress=False, device="cpu")
    assert asked == [1, 2]
    assert result.steps == 20 and len(result.loss_curve) == 20
    assert [s for s, _ in result.eval_curve] == [10, 20]  # no extra final evaluation
    assert result.metrics == result.eval_curve[-1][1]


def test_fused_adamw_makes_the_same_update_as_the_loop():
    """train() picks the fused kernel; its steps equal the per-tensor loop's up to rounding."""
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    start = a.body.weight.detach().clone()
    assert train._fused(list(a.parameters())) == {"fused": True}
    opts = [torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True), torch.optim.AdamW(b.parameters(), lr=1e-2)]
    for batch in toy_data() * 3:
        for model, opt in zip((a, b), opts):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.allclose(a.body.weight, start, atol=1e-3)  # the steps did move the weights


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_a_nan_loss_stops_at_its_step_with_the_weights_before_it():
    torch.manual_seed(0)
    model = Net()
    seen = []

    def nan_at_step_3(m, batch):
        seen.append(_params(m))  # the weights this step starts from
        loss = loss_fn(m, batch)
        return loss * float("nan") if len(seen) == 3 else loss

    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3.*lower lr"):
        train.train(model, toy_data(), nan_at_step_3, steps=10, lr=1e-1, progress=False, device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), seen[2]))  # step 3 made no update
    assert not any(p.isnan().any() for p in model.parameters())


@pytest.mark.parametrize("clip", [1.0, None])
def test_a_non_finite_gradient_with_a_finite_loss_stops_too(clip):
    torch.manual_seed(0)
    model = Net()
    before = _params(model)

    def nan_gradient(m, batch):  # sqrt(0) is 0, its derivative inf: the loss stays finite, the gradient is nan
        return loss_fn(m, batch) + (m.head.bias.sum() * 0).sqrt()

    with pytest.raises(FloatingPointError, match="gradient norm is nan at step 1") as err:
        train.train(model, toy_data(), nan_gradient, steps=5, progress=False, device="cpu", clip=clip)
    assert ("clip=1.0" in str(err.value)) == (clip is None)  # suggested only where there was no clipping
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("bad, name", [
    (dict(steps=2.5), "steps"), (dict(steps="3"), "steps"), (dict(steps=True), "steps"), (dict(steps=0), "steps"),
    (dict(lr=0), "lr"), (dict(lr=-1e-3), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr="1e-3"), "lr"),
    (dict(clip=0), "clip"), (dict(clip=-1), "clip"), (dict(clip=float("inf")), "clip"), (dict(clip="1"), "clip"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(weight_decay=float("nan")), "weight_decay"),
    (dict(warmup=-0.1), "warmup"), (dict(warmup=2.5), "warmup"), (dict(warmup=11), "warmup"), (dict(warmup="3"), "warmup"),
    (dict(eval_every=0, evaluate=lambda m: {}), "eval_every"), (dict(eval_every=2.5, evaluate=lambda m: {}), "eval_every"),
    (dict(eval_every=2), "evaluate"), (dict(should_stop=lambda curve: True, evaluate=lambda m: {}), "should_stop"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(seed=True), "seed"),
])
def test_train_refuses_bad_arguments_before_touching_the_model(bad, name):
    model = Net()
    before = _params(model)
    kwargs = dict(steps=10, progress=False, device="cpu") | bad
    with pytest.raises(ValueError, match=name):
        train.train(model, toy_data(), loss_fn, **kwargs)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_train_accepts_the_edges():
    for kwargs in (dict(warmup=0), dict(warmup=10), dict(warmup=0.5), dict(clip=None), dict(seed=0), dict(steps=1)):
        train.train(Net(), toy_data(), loss_fn, **(dict(steps=10, progress=False, device="cpu") | kwargs))


def test_an_interrupted_run_leaves_eval_mode_and_no_gradients():
    model = Net()
    calls = []

    def interrupted(m, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss_fn(m, batch)

    with pytest.raises(KeyboardInterrupt):
        train.train(model, toy_data(), interrupted, steps=10, progress=False, device="cpu")
    assert not model.training and all(p.grad is None for p in model.parameters())
    train.train(model, toy_data(), loss_fn, steps=2, progress=False, device="cpu")  # and after a finished run
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_a_generator_of_batches_says_it_ran_out():
    with pytest.raises(ValueError, match="ran out after 4"):
        train.train(Net(), (b for b in toy_data()), loss_fn, steps=10, progress=False, device="cpu")
    with pytest.raises(ValueError, match="ran out after 4"):  # a function of the epoch handing out the same one
        once = iter(toy_data())
        train.train(Net(), lambda epoch: once, loss_fn, steps=10, progress=False, device="cpu")
    train.train(Net(), lambda epoch: iter(toy_data(seed=epoch)), loss_fn, steps=10, progress=False, device="cpu")
