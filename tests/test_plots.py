import pytest

from pefttutor import plots


def draw():
    fig, ax = plots.figure()
    ax.plot([0, 1, 2], [1, 3, 2], label="x")
    ax.legend()
    return fig


def test_save_is_reproducible(tmp_path):
    a = plots.save(draw(), "demo", folder=tmp_path / "a")
    b = plots.save(draw(), "demo", folder=tmp_path / "b")
    assert [p.name for p in a] == ["demo.svg", "demo.png"]
    assert a[0].read_bytes() == b[0].read_bytes()
    assert a[1].read_bytes() == b[1].read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp.*"))


def test_bad_name_refused(tmp_path):
    with pytest.raises(ValueError):
        plots.save(draw(), "../escape", folder=tmp_path)


def test_fast_mode_does_not_export(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTTUTOR_FAST", "1")
    monkeypatch.setenv("PEFTTUTOR_FIGURES", str(tmp_path))
    plots.show(draw(), "fast")
    assert not list(tmp_path.iterdir())


def test_every_study_method_has_its_own_colour():
    from pefttutor.study import experiments

    by_task = {}
    for e in experiments.experiments():
        if e["group"] == "final":  # the methods (the rank group's LoRA variants are one method's settings)
            by_task.setdefault(e["task"], set()).add(e["name"])
    for task, names in by_task.items():
        colours = [plots.method_color(n) for n in sorted(names)]
        assert len(set(colours)) == len(colours), task  # within a figure, no two methods share a colour
    with pytest.raises(KeyError, match="known: full, head"):
        plots.method_color("LoRA")
