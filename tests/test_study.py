"""The study runner: a tiny study in fast mode runs, skips what is done, resumes after an
interruption, reruns a stale result; the protocol's stopping rule; every experiment's spec builds."""

import json
import math
import statistics

import pytest
import torch

from pefttutor import config, protocol, train
from pefttutor.models import BertClassifier
from pefttutor.study import experiments, methods, report, runner
from tiny_models import tiny_bert, tiny_llama


@pytest.mark.parametrize("values, mode, patience, stop", [
    ([0.5, 0.6, 0.7], "max", 2, False),
    ([0.5, 0.7, 0.6, 0.65], "max", 2, True),
    ([0.5, 0.7, 0.6, 0.71], "max", 2, False),
    ([0.5, 0.7, 0.7, 0.7], "max", 2, True),  # ties are no improvement
    ([2.0, 1.5, 1.6], "min", 1, True),
    ([2.0, 1.5, 1.4], "min", 1, False),
    ([2.0], "min", 1, False),
])
def test_plateaued_is_the_stopping_rule(values, mode, patience, stop):
    curve = [(i, {"m": v}) for i, v in enumerate(values)]
    assert protocol.plateaued(curve, "m", mode, patience) is stop


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError, match="minilm-tweets, smollm2-restaurants"):
        protocol.task("imdb")


def test_experiments_are_unique_and_every_final_run_follows_its_sweep():
    exps = experiments.experiments()
    ids = [e["id"] for e in exps]
    assert len(ids) == len(set(ids))
    for i, e in enumerate(exps):
        if e["lr"] == "sweep":
            sweep = experiments.sweep_of(e, exps)
            assert len(sweep) == 3 and all(ids.index(s["id"]) < i for s in sweep), e["id"]
    tweets = {e["name"] for e in exps if e["task"] == "minilm-tweets" and e["group"] == "final"}
    assert tweets == set(experiments.TWEET_METHODS)
    restaurants = {e["name"] for e in exps if e["task"] == "smollm2-restaurants"}
    assert restaurants == set(experiments.RESTAURANT_METHODS) | {"untuned"}
    assert set(experiments.RESTAURANT_LR_SOURCE) == set(experiments.RESTAURANT_METHODS)  # every rate says where it came from
    assert {e["name"] for e in exps} <= set(experiments.LABELS)
    longer = [e for e in exps if e["group"] == "longer"]
    assert longer and all(e["epochs"] == 2 * protocol.TweetTask.max_epochs for e in longer)
    rank = [e for e in exps if e["group"] == "rank"]  # LoRA's rank with alpha fixed and alpha = 2r, at LoRA's rate
    assert {(e["spec"]["r"], e["spec"]["alpha"]) for e in rank} == {(r, a) for r in (1, 4, 16, 64) for a in (16, 2 * r)}
    assert all(experiments.sweep_of(e, exps) == experiments.sweep_of({**e, "name": "lora-qv"}, exps) for e in rank)


@pytest.mark.parametrize("name", list(experiments.TWEET_METHODS))
def test_every_tweet_spec_builds_on_a_classifier(name):
    spec = experiments.TWEET_METHODS[name][0]
    model = methods.build(BertClassifier(tiny_bert(), 3), json.loads(json.dumps(spec)))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    if spec["method"] not in ("full", "head", "features"):
        assert trainable - {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("name", list(experiments.RESTAURANT_METHODS))
def test_every_restaurant_spec_builds_on_a_llama(name, tmp_path):
    spec = experiments.RESTAURANT_METHODS[name][0]
    model = methods.build(tiny_llama(), json.loads(json.dumps(spec)))
    assert any(p.requires_grad for p in model.parameters())
    methods.for_inference(model, spec)
    methods.save(model, spec, tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").stat().st_size > 0


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="lora"):
        methods.build(tiny_llama(), {"method": "loRA"})


def _tiny_study():
    spec = {"method": "head"}
    sweep = [{"id": f"minilm-tweets/sweep/head_lr{lr:.0e}_s0", "task": "minilm-tweets", "group": "sweep",
              "name": "head", "spec": spec, "lr": lr, "seed": 0, "epochs": 0.5, "autocast": "bf16"}
             for lr in (1e-3, 3e-2)]
    final = [{"id": "minilm-tweets/final/head_s0", "task": "minilm-tweets", "group": "final", "name": "head",
              "spec": spec, "lr": "sweep", "seed": 0, "epochs": 1, "autocast": "bf16"}]
    return sweep + final


@pytest.fixture(scope="module")
def fast_mode():
    mp = pytest.MonkeyPatch()
    mp.setenv("PEFTTUTOR_FAST", "1")
    yield
    mp.undo()


def test_a_tiny_study_runs_skips_resumes_and_reruns_stale(fast_mode, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "MAX_EXTENSIONS", 0)  # a 2-rate grid always peaks at an edge (tested below)
    exps = _tiny_study()
    device = torch.device("cpu")
    logs = []
    real_run_one = runner.run_one

    def interrupted(exp, dev):  # the final run is cut short, as by Ctrl-C or the end of a session
        if exp["group"] == "final":
            (tmp_path / "minilm-tweets" / "final").mkdir(parents=True, exist_ok=True)
            (tmp_path / "minilm-tweets" / "final" / "tmpabc.tmp").write_text('{"half": ')
            raise KeyboardInterrupt
        return real_run_one(exp, dev)

    monkeypatch.setattr(runner, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run_study(exps, exps, tmp_path, device, log=logs.append)
    assert [runner.status(e, exps, tmp_path) for e in exps] == ["done", "done", "todo"]
    monkeypatch.setattr(runner, "run_one", real_run_one)

    counts = runner.run_study(exps, exps, tmp_path, device, log=logs.append)
    assert counts == {"ran": 1, "skipped": 2, "waiting": 0}  # resumed at the interrupted run
    assert runner.run_study(exps, exps, tmp_path, device, log=logs.append) == {"ran": 0, "skipped": 3, "waiting": 0}

    sweep = [runner.read(e["id"], tmp_path) for e in exps[:2]]
    final = runner.read(exps[2]["id"], tmp_path)
    best_sweep = max(sweep, key=lambda r: r["best"]["validation"]["accuracy"])
    assert final["config"]["lr"] == best_sweep["config"]["lr"]
    assert final["config"]["lr_from"] == [e["id"] for e in exps[:2]]
    task = runner.get_task("minilm-tweets", device)
    assert final["max_steps"] == task.steps_per_epoch and 1 <= final["steps"] <= final["max_steps"]
    assert final["autocast_used"] == ("bf16" if train.native_bf16(device) else None)  # the study's bf16 policy
    assert len(final["loss_curve"]) == final["steps"]
    assert [s for s, _ in final["validation_curve"]][-1] == final["steps"]
    best_val = max(m["accuracy"] for _, m in final["validation_curve"])
    assert final["best"]["validation"]["accuracy"] == best_val
    assert len(final["best"]["test"]["predictions"]) == len(task.splits["test"])  # for paired comparisons
    for at in ("best", "end"):
        test = final[at]["test"]
        assert test["n"] == len(task.splits["test"]) and 0 <= test["accuracy"] <= 1
        assert math.isclose(test["accuracy_se"], math.sqrt(test["accuracy"] * (1 - test["accuracy"]) / test["n"]))
    cost = final["cost"]
    assert cost["trainable_params"] == 384 * 3 + 3 == cost["stored_params"]
    assert cost["file_bytes"] > 4 * cost["stored_params"] and cost["median_step_s"] > 0 and cost["latency_ms"] > 0
    prov = final["provenance"]
    assert {"git_commit", "date", "torch", "transformers", "device", "device_name", "threads", "dtype"} <= set(prov)
    assert prov["mode"] == "fast" and prov["device"] == "cpu"
    assert isinstance(prov["uncommitted"], list) and prov["git_commit"].endswith("+uncommitted") == bool(prov["uncommitted"])
    assert all(path.startswith("pefttutor/") for path in prov["uncommitted"]), prov["uncommitted"]  # whole paths

    # a changed config makes the stored result stale: it is rerun, not read
    changed = [dict(e, epochs=0.25) if e["group"] == "sweep" and e["lr"] == 1e-3 else e for e in exps]
    assert runner.status(changed[0], changed, tmp_path) == "stale"
    assert runner.run_study(changed[:1], changed, tmp_path, device, log=logs.append)["ran"] == 1

    text = report.render(tmp_path, exps)
    assert "| head | " in text and "Learning-rate sweep" in text and "## Provenance" in text


def test_a_final_run_waits_for_its_sweep(tmp_path):
    exps = _tiny_study()
    with pytest.raises(LookupError, match="sweep"):
        runner.resolve(exps[2], exps, tmp_path)
    counts = runner.run_study(exps[2:], exps, tmp_path, torch.device("cpu"), log=lambda s: None)
    assert counts == {"ran": 0, "skipped": 0, "waiting": 1}


def test_select_by_glob_substring_and_seed():
    exps = experiments.experiments()
    assert {e["name"] for e in runner.select(exps, "lora-qv", None)} == {"lora-qv"} | set(experiments.RANK_SWEEP)
    assert {e["group"] for e in runner.select(exps, "final/lora-qv", None)} == {"final"}
    only = runner.select(exps, "smollm2-restaurants/final/*_s0", None)
    assert only and all(e["seed"] == 0 and e["task"] == "smollm2-restaurants" for e in only)
    seeds = runner.select(exps, None, (1,))
    assert all(e["seed"] == 1 or e["group"] == "sweep" for e in seeds)


def test_list_shows_every_experiment_with_its_status(tmp_path, capsys):
    assert runner.main(["--list", "--results", str(tmp_path), "--only", "minilm-tweets/*/head*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["todo", "minilm-tweets/sweep/head_lr3e-03_s0"]
    assert any(line.split()[0] == "waiting" for line in lines)


def test_fast_mode_never_writes_into_the_committed_results(fast_mode):
    assert runner.results_dir() != config.repo_root() / "results"


def _fake_record(exp, accuracy):
    return {"config": exp, "metric": "accuracy", "mode": "max", "best": {"validation": {"accuracy": accuracy}}}


@pytest.mark.parametrize("accs, extra, chosen", [
    ({1e-3: 0.6, 3e-3: 0.7, 1e-2: 0.65}, {}, 3e-3),  # interior best: no extension
    ({1e-3: 0.6, 3e-3: 0.65, 1e-2: 0.7}, {3e-2: 0.5}, 1e-2),  # best at the top edge: 3e-2 tried, worse
    ({1e-3: 0.7, 3e-3: 0.65, 1e-2: 0.6}, {3e-4: 0.72, 1e-4: 0.71}, 3e-4),  # bottom edge, extended twice
    ({1e-3: 0.6, 3e-3: 0.65, 1e-2: 0.7}, {3e-2: 0.75, 1e-1: 0.8}, 1e-1),  # at most MAX_EXTENSIONS past an edge
])
def test_a_sweep_peaking_at_an_edge_is_extended_first(tmp_path, accs, extra, chosen):
    grid = [{"id": f"t/sweep/m_lr{lr:.0e}_s0", "task": "t", "group": "sweep", "name": "m", "spec": {}, "lr": lr,
             "seed": 0, "epochs": 1, "autocast": None} for lr in accs]
    final = {"id": "t/final/m_s0", "task": "t", "group": "final", "name": "m", "spec": {}, "lr": "sweep", "seed": 0,
             "epochs": None, "autocast": None}
    exps = grid + [final]
    for e in grid:
        runner.write(_fake_record(e, accs[e["lr"]]), tmp_path)
    tried = []
    while True:
        try:
            resolved = runner.resolve(final, exps, tmp_path)
            break
        except runner.NeedsExtension as need:
            tried.append(need.exp["lr"])
            assert need.exp["id"] == f"t/sweep/m_lr{need.exp['lr']:.0e}_s0" and need.exp["extends"]
            runner.write(_fake_record(need.exp, extra[need.exp["lr"]]), tmp_path)
    assert tried == list(extra) and resolved["lr"] == chosen
    assert len(resolved["lr_from"]) == len(accs) + len(extra)
    assert runner.status(final, exps, tmp_path) == "todo"


@pytest.mark.parametrize("x, expected", [(9.49e-4, 1e-3), (3.16e-2, 3e-2), (1e-2 / 10**0.5, 3e-3), (0.316, 0.3)])
def test_half_decade_grid(x, expected):
    assert runner._half_decade(x) == pytest.approx(expected)


def _tweet_run(preds, seed=0):
    from pefttutor import data

    gold = [ex["label"] for ex in data.load_tweets("test")]
    scores = protocol.classification_scores(preds, gold)
    return {"config": {"task": "minilm-tweets", "name": "x", "seed": seed}, "best": {"test": {**scores, "predictions": preds}}}


def test_gap_is_paired_when_predictions_are_stored():
    from pefttutor import data

    gold = [ex["label"] for ex in data.load_tweets("test")]
    wrong = [(y + 1) % 3 for y in gold]
    a = [_tweet_run([w if i % 10 == 0 else y for i, (y, w) in enumerate(zip(gold, wrong))])]  # 90% right
    b = [_tweet_run([w if i % 10 in (0, 1) else y for i, (y, w) in enumerate(zip(gold, wrong))])]  # 80%, same items +
    d, se = report.gap(a, b, "accuracy")
    assert d == pytest.approx(10.0)
    # paired: b's errors include a's, so the difference's only randomness is the 10% of items where they differ
    assert se == pytest.approx(100 * math.sqrt(0.1 * 0.9 / len(gold)), rel=0.25)
    for r in a + b:
        del r["best"]["test"]["predictions"]
    d2, unpaired = report.gap(a, b, "accuracy")
    assert d2 == d and unpaired == pytest.approx(100 * math.hypot(a[0]["best"]["test"]["accuracy_se"],
                                                                  b[0]["best"]["test"]["accuracy_se"]))
    assert unpaired > 1.5 * se


def test_the_untuned_baseline_uses_the_chat_prompt(fast_mode, tmp_path):
    exp = next(e for e in experiments.experiments() if e["name"] == "untuned")
    record = runner.run_one(exp, torch.device("cpu"))
    task = runner.get_task("smollm2-restaurants", torch.device("cpu"))
    test = record["best"]["test"]
    assert record["steps"] == 0 and record["cost"]["trainable_params"] == 0 == record["cost"]["file_bytes"]
    assert len(test["predictions"]) == len(task.splits["test"]) and test["predictions"][0] == test["example"]
    assert test["predictions"] == task.generate(task.new_model(0), "test", chat=True)
    assert {"BLEU", "ROUGE-L", "BLEU_se", "ROUGE-L_se"} <= set(test)
    assert "<|im_start|>" in task.prompts_of("test", chat=True)[0]


def test_notebooks_read_the_committed_runs_and_the_table_agrees_with_them(fast_mode):
    runs = report.runs("minilm-tweets")  # results/, also in fast mode
    assert runs and all(r["config"]["task"] == "minilm-tweets" and r["config"]["group"] == "final" for r in runs)
    rows = {row["method"]: row for row in report.summary(runs, "accuracy")}
    full = [r for r in runs if r["config"]["name"] == "full"]
    assert rows["full"]["mean"] == pytest.approx(statistics.fmean(r["best"]["test"]["accuracy"] for r in full))
    assert rows["full"]["gap"] is None and rows["full"]["seeds"] == len(full)
    head = [r for r in runs if r["config"]["name"] == "head"]
    assert rows["head"]["gap"] == pytest.approx(report.gap(head, full, "accuracy"))
    text = report.render(config.repo_root() / "results", experiments.experiments())
    assert f"| full | {rows['full']['lr']:g} | {len(full)} | {rows['full']['mean']:.4f}" in text
    prov = report.provenance(runs)
    assert prov["dates"][0] <= prov["dates"][1] and all(len(c) == 12 for c in prov["commits"])
    assert report.runs("no-such-task") == []


def test_indistinguishable_means_within_two_standard_errors():
    assert report.indistinguishable((-1.1, 0.6)) and report.indistinguishable((1.1, 0.6))
    assert not report.indistinguishable((-1.3, 0.6)) and not report.indistinguishable((1.3, 0.6))


def test_format_gap_marks_what_is_within_noise():
    assert report.format_gap((-1.1, 0.6)) == "-1.1 ± 0.6 ≈"
    assert report.format_gap((1.3, 0.6), ", indistinguishable", unit=" points") == "+1.3 ± 0.6 points"
    assert report.format_gap((0.2, 0.5), ", indistinguishable", unit=" points") == "+0.2 ± 0.5 points, indistinguishable"
    assert report.format_gap(None) == "—" and report.format_gap(None, missing="") == ""


def test_sweep_rows_and_best_rate_pick_the_rate_the_runner_picks(tmp_path):
    accs = {1e-3: 0.6, 3e-3: 0.7, 1e-2: 0.65}
    grid = [{"id": f"t/sweep/m_lr{lr:.0e}_s0", "task": "t", "group": "sweep", "name": "m", "spec": {}, "lr": lr,
             "seed": 0, "epochs": 1, "autocast": None} for lr in accs]
    records = [_fake_record(e, accs[e["lr"]]) for e in grid]
    for r in records:
        r["best"]["step"] = 10
    assert report.best_rate(records[::-1])["config"]["lr"] == 3e-3  # whatever the order
    rows = report.sweep_rows(records[::-1], {"m": "method m"})
    assert [row["rate"] for row in rows] == ["0.001", "0.003", "0.01"]
    assert [row["chosen"] for row in rows] == ["", "yes", ""] and {row["method"] for row in rows} == {"method m"}
    assert [row["best validation accuracy"] for row in rows] == [0.6, 0.7, 0.65]
    final = {"id": "t/final/m_s0", "task": "t", "group": "final", "name": "m", "spec": {}, "lr": "sweep", "seed": 0,
             "epochs": None, "autocast": None}
    for r in records:
        runner.write(r, tmp_path)
    assert runner.resolve(final, grid + [final], tmp_path)["lr"] == 3e-3


def test_quality_rows_show_the_summary_with_its_verdict(fast_mode):
    rows = report.summary(report.runs("minilm-tweets"), "accuracy", ["full", "lora-qv", "head"])
    shown = {q["method"]: q for q in report.quality_rows(rows, "accuracy", 3, experiments.LABELS)}
    by_name = {r["method"]: r for r in rows}
    lora = shown[experiments.LABELS["lora-qv"]]
    assert lora["test accuracy"] == f"{by_name['lora-qv']['mean']:.3f} ± {by_name['lora-qv']['std']:.3f}"
    assert lora["Δ vs full (points)"] == report.format_gap(by_name["lora-qv"]["gap"], ", indistinguishable")
    assert shown[experiments.LABELS["full"]]["Δ vs full (points)"] == "—"
    assert "indistinguishable" not in shown[experiments.LABELS["head"]]["Δ vs full (points)"]  # 9 points below


class _ScriptedTask:
    """A classification task on random tokens whose validation scores follow `scores`, counting
    the test passes: what `_train_run` does around the training loop, without the real data."""

    metric, mode = "accuracy", "max"
    loss = staticmethod(train.classification_loss)

    def __init__(self, scores):
        self.scores, self.test_passes = iter(scores), []
        g = torch.Generator().manual_seed(0)
        self.batch = {"input_ids": torch.randint(1, 64, (4, 8), generator=g),
                      "attention_mask": torch.ones(4, 8, dtype=torch.long), "labels": torch.tensor([0, 1, 2, 0])}

    def budget(self, epochs):
        return protocol.Budget(max_steps=6, eval_every=2, patience=2)

    def new_model(self, seed):
        return BertClassifier(tiny_bert(seed), 3)

    def train_batches(self, seed):
        return lambda epoch: [self.batch]

    def validate(self, model):
        return {"accuracy": next(self.scores)}

    def evaluate(self, model, split, predictions=False):
        assert split == "test"
        self.test_passes.append(predictions)
        out = {"accuracy": round(float(model.classifier.weight.detach().sum()), 6), "n": 4}
        return {**out, "predictions": [0, 1, 2, 0]} if predictions else out

    def latency_batch(self):
        return self.batch


@pytest.mark.parametrize("scores, best_step, passes", [
    ([0.5, 0.6, 0.7], 6, [True]),  # best at the last step: one test pass serves both
    ([0.5, 0.7, 0.6], 4, [False, True]),  # best earlier: the end's weights, then the best's restored
])
def test_a_run_evaluates_the_test_set_once_when_its_last_step_is_its_best(scores, best_step, passes):
    task = _ScriptedTask(scores)
    exp = {"spec": {"method": "head"}, "autocast": None, "epochs": 1, "seed": 0, "lr": 1e-2}
    out = runner._train_run(exp, task, torch.device("cpu"))
    assert out["steps"] == 6 and out["best"]["step"] == best_step and task.test_passes == passes
    assert "predictions" in out["best"]["test"] and "predictions" not in out["end"]["test"]
    assert (out["best"]["test"]["accuracy"] == out["end"]["test"]["accuracy"]) is (best_step == 6)
