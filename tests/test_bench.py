"""The benchmark harness (benchmarks/bench.py) on tiny random models: every method and variant runs,
results.json has the documented schema, and RESULTS.md renders every measured row."""

import importlib
import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from pefttutor import train
from pefttutor.config import repo_root

FIELDS = {"section", "impl", "model", "method", "batch", "seq_len", "metric", "median", "min", "max", "runs"}


@pytest.fixture(scope="module")
def benchmarks():
    """benchmarks/bench.py and the modules beside it, imported by name from that folder, as they import each other."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(repo_root() / "benchmarks"))
        yield SimpleNamespace(**{name: importlib.import_module(name)
                                 for name in ("bench", "harness", "kits", "methods", "rendering", "runs")})


@pytest.fixture(scope="module")
def run(benchmarks, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    benchmarks.bench.main(["--weights", "tiny", "--quick", "--device", "cpu", "--repeats", "2", "--warmup", "0",
                           "--out", str(out)])
    return json.loads((out / "results.json").read_text()), (out / "RESULTS.md").read_text()


def test_records_have_the_schema(run):
    result, _ = run
    assert {"machine", "settings", "wall_time_s", "records"} <= result.keys()
    assert {"cpu", "cores", "torch", "transformers", "peft", "device", "date"} <= result["machine"].keys()
    for r in result["records"]:
        assert r.keys() == FIELDS, r
        assert r["impl"] in ("pefttutor", "peft") and r["model"] in ("smollm2", "minilm")
        assert r["min"] <= r["median"] <= r["max"], r
        assert r["runs"] == (2 if r["metric"] in ("step_time_s", "latency_ms", "latency_vs_base") else 1), r
        assert r["median"] > 0, r


def test_every_method_is_measured_by_both(run, benchmarks):
    result, _ = run
    records = result["records"]
    seen = {(r["section"], r["impl"], r["model"], r["method"], r["metric"]) for r in records}
    for key, method in benchmarks.methods.METHODS.items():
        for model in method.models:
            for impl in benchmarks.methods.IMPLS:
                for metric in ("step_time_s", "peak_memory_mb", "step_memory_mb", "trainable_params"):
                    for row in (key, key + "+bf16"):  # fp32, and both under the same bf16 autocast
                        assert ("train", impl, model, row, metric) in seen, (impl, model, row, metric)
    for key, variant in benchmarks.methods.VARIANTS.items():
        impls = benchmarks.methods.IMPLS if variant.peft is not None else ("pefttutor",)
        for model in ("smollm2", "minilm"):
            for impl in impls:
                assert ("latency", impl, model, key, "latency_ms") in seen
                assert (key == "base") != (("latency", impl, model, key, "latency_vs_base") in seen)
    quick = benchmarks.runs.QUICK
    assert {r["seq_len"] for r in records if r["section"] == "scaling_seq"} == set(quick["scaling_seqs"])
    assert {r["method"] for r in records if r["section"] == "scaling_rank"} == {
        f"lora_qv_r{r}" for r in quick["scaling_ranks"]}


def test_same_method_same_trainable_count(run):
    """Both implementations train the same number of parameters (LLaMA-Adapter: peft's gate is one
    scalar per layer, pefttutor's one per head, as in the paper)."""
    result, _ = run
    counts = {}
    for r in result["records"]:
        if r["metric"] == "trainable_params":
            counts.setdefault((r["model"], r["method"]), {})[r["impl"]] = r["median"]
    for (model, method), c in counts.items():
        if not method.startswith("llama_adapter"):
            assert c["pefttutor"] == c["peft"], (model, method, c)


def test_results_md_renders_every_row(run, benchmarks):
    result, md = run
    assert md == benchmarks.rendering.render(result)
    assert result["machine"]["cpu"] in md and result["machine"]["torch"] in md
    for title in ("## Training step", "## Inference latency", "## Scaling with sequence length",
                  "## Scaling with LoRA rank", "## How memory is measured"):
        assert title in md
    table_rows = [line for line in md.splitlines() if line.startswith("| smollm2") or line.startswith("| minilm")]
    keys = {(r["section"], r["model"], r["method"], r["batch"]) for r in result["records"]
            if r["section"] in ("train", "latency")}
    assert len(table_rows) == len(keys)
    tables, previous = [], False
    for line in md.splitlines():  # consecutive "|" lines form a table: each has the header's columns
        if line.startswith("|"):
            if not previous:
                tables.append([])
            tables[-1].append(line.count("|"))
        previous = line.startswith("|")
    assert len(tables) == 4 and all(len(set(t)) == 1 for t in tables)
    ratio = [line for line in table_rows if " full finetuning " in line][0]
    assert ratio.count("x") >= 3  # time ratios (median / min) and the memory ratio


def test_step_peak_counts_allocations(benchmarks):
    """The CPU memory measure is exact for tensors: a 4 MiB temporary shows up as 4 MiB."""

    def fn():
        x = torch.empty(2**20)  # 4 MiB
        del x
        torch.empty(2**18)  # 1 MiB, freed right away

    harness = benchmarks.harness
    assert harness.step_peak_bytes(fn, torch.device("cpu")) == 2**22
    assert harness.tensor_bytes([torch.empty(10), torch.empty(10)]) == 80
    w = torch.empty(10)
    assert harness.tensor_bytes([w, w]) == 40  # a tied tensor counts once


@pytest.mark.parametrize("name", ["smollm2", "minilm"])
def test_both_implementations_compute_the_same_loss(benchmarks, name):
    """Same weights, same batch: each implementation's own loss (pefttutor.train's, transformers'
    from labels) has the same value, so the two steps do the same work."""
    kit = benchmarks.kits.load_kit(name, torch.device("cpu"), "tiny")
    batch = kit.batch(2, 8, torch.device("cpu"))
    losses = [kit.loss(kit.task(kit.fresh(impl), impl).eval(), batch, impl) for impl in benchmarks.methods.IMPLS]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)


def test_interleaved_rounds_order_and_time_budget(benchmarks):
    """Rounds alternate the order; fast calls get extra rounds up to the time budget; gc is back on."""
    import gc
    import time

    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: (calls.append("b"), time.sleep(0.002))}
    interleaved = benchmarks.harness.interleaved
    times = interleaved(fns, repeats=3, warmup=1, device=torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"] and len(times["a"]) == 3
    more = interleaved(fns, repeats=3, warmup=0, device=torch.device("cpu"), min_seconds=0.05, max_repeats=40)
    assert 3 < len(more["a"]) == len(more["b"]) <= 40
    assert gc.isenabled()


def test_bf16_rows_are_labelled(benchmarks):
    m = benchmarks.methods
    assert m.label("lora_qv+bf16") == "LoRA Wq,Wv r=8, bf16 autocast"
    assert m.base_key("lora_qv+bf16") == "lora_qv" and m.label("full") == "full finetuning"


def _script(name: str, monkeypatch):
    """A benchmarks/ script as a module, in fast mode (it imports `bench` from its folder)."""
    monkeypatch.syspath_prepend(str(repo_root() / "benchmarks"))
    monkeypatch.setenv("PEFTTUTOR_FAST", "1")
    spec = importlib.util.spec_from_file_location(name, repo_root() / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_to_accuracy_runs_every_contestant_and_renders(benchmarks, tmp_path, monkeypatch):
    """A smoke run in fast mode (shrunk data): Trainer + peft twice and pefttutor, one table."""
    tta = _script("time_to_accuracy", monkeypatch)
    out = tmp_path / "tta.json"
    assert tta.main(["--quick", "--target", "0.4", "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"Trainer + peft, defaults", "Trainer + peft, best flags", "pefttutor"}
    for r in result["runs"].values():
        times = [t for t, _ in r["curve"]]
        assert len(times) == 12 and times == sorted(times) and 0 <= r["test_accuracy"] <= 1
        reached = [t for t, acc in r["curve"] if acc >= 0.4]
        assert r["time_to_target_s"] == (reached[0] if reached else None)
    assert result["runs"]["Trainer + peft, best flags"]["flags"]["train_sampling_strategy"] == "group_by_length"
    md = "\n".join(benchmarks.rendering.time_to_accuracy_section(result))
    assert md.count("\n| ") == 4 and "vs Trainer best flags" in md
    assert tta.time_to([(1.0, 0.3), (2.0, 0.5), (3.0, 0.6)], 0.5) == 2.0 and tta.time_to([(1.0, 0.3)], 0.5) is None


def test_speedups_measure_every_row_and_render(benchmarks, tmp_path, monkeypatch):
    """A smoke run in fast mode: every speed-up is measured against what it replaced, one table."""
    sp = _script("speedups", monkeypatch)
    out = tmp_path / "speedups.json"
    assert sp.main(["--steps", "1", "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    kinds = [r["speed-up"] for r in result["rows"]]
    n = 2 if result["native_bf16"] else 1  # bf16 rows only where bf16 kernels are native
    assert result["native_bf16"] == train.native_bf16("cpu")
    assert kinds.count("bf16 autocast") == 2 * (n - 1) and kinds.count("LM head at labelled positions only") == n
    assert "fused AdamW" in kinds and kinds.count("validation sorted by length") == n
    assert all(r["before"] > 0 and r["after"] > 0 for r in result["rows"])
    md = "\n".join(benchmarks.rendering.speedups_section(result))
    assert md.count("\n| ") == len(result["rows"]) + 1


def test_the_old_lm_loss_equals_the_new_one(benchmarks, monkeypatch):
    """speedups.py times causal_lm_loss against the all-positions loss it replaced: same value."""
    sp = _script("speedups", monkeypatch)
    from tiny_models import tiny_llama

    from pefttutor import train

    model = tiny_llama()
    ids = torch.randint(5, 64, (2, 6))
    labels = ids.clone()
    labels[:, :2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert torch.allclose(sp.all_positions_lm_loss(model, batch), train.causal_lm_loss(model, batch), atol=1e-6)
