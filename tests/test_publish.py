"""Blog outputs: the figures index and the static site, the site checked in headless Chromium."""

import os
import shutil

import nbformat
import pytest

from pefttutor import plots, publish
from pefttutor.config import repo_root

NOTEBOOKS = publish.notebooks()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_figure_names_and_index(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('plots.show(fig, "07_a-b",\n    caption="x")\nplots.show(fig)'),
                nbformat.v4.new_markdown_cell('plots.show(fig, "not-code")'),
                nbformat.v4.new_code_cell("plots.show(ax_fig, '07_c')")]
    path = tmp_path / "07_demo.ipynb"
    nbformat.write(nb, path)
    assert publish.figure_names(path) == ["07_a-b", "07_c"]
    fig, ax = plots.figure()
    ax.plot([0, 1])
    plots.save(fig, "07_a-b", folder=tmp_path, caption="A | caption with <markup>")
    assert publish.caption(tmp_path / "07_a-b.svg") == "A | caption with <markup>"
    assert publish.missing_figures([path], tmp_path) == {path: ["07_c"]}
    text = publish.write_index(tmp_path, [path]).read_text()
    assert "| [07_a-b.svg](07_a-b.svg) · [png](07_a-b.png) | A / caption with <markup> |" in text
    assert "| [07_c.svg](07_c.svg) · [png](07_c.png) | (missing: run `make figures`) |" in text


def test_default_caption_is_the_figures_titles(tmp_path):
    fig, (a, b) = plots.figure(1, 2)
    a.set_title("left")
    b.set_title("right")
    plots.save(fig, "t", folder=tmp_path)
    assert publish.caption(tmp_path / "t.svg") == "left; right"
    fig.suptitle("whole")
    assert plots.caption_of(fig) == "whole"


def test_committed_figures_cover_every_notebook_and_have_captions():
    folder = repo_root() / "figures"
    assert publish.missing_figures(NOTEBOOKS, folder) == {}
    for nb in NOTEBOOKS:
        for name in publish.figure_names(nb):
            assert publish.caption(folder / f"{name}.svg"), f"{name}.svg has no caption"
    index = (folder / "README.md").read_text()
    assert index == _index_as_written(folder), "figures/README.md is stale: run `make figures`"


def _index_as_written(folder):
    tmp = folder / ".index-check"
    tmp.mkdir(exist_ok=True)
    try:
        for p in folder.glob("*.svg"):
            shutil.copy(p, tmp / p.name)
        return publish.write_index(tmp, NOTEBOOKS).read_text()
    finally:
        shutil.rmtree(tmp)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    return out, publish.build_site(NOTEBOOKS, out)


def test_site_has_an_index_in_the_blogs_order(site):
    out, pages = site
    assert [p.name for p in pages] == ["index.html"] + [f"{nb.stem}.html" for nb in NOTEBOOKS]
    index = (out / "index.html").read_text()
    positions = [index.index(f'href="{nb.stem}.html"') for nb in NOTEBOOKS]
    assert positions == sorted(positions)


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.skipif(CHROMIUM is None and os.environ.get("PEFTTUTOR_REQUIRE_BROWSER") != "1",
                    reason="no Chromium here (CI installs it and sets PEFTTUTOR_REQUIRE_BROWSER=1)")
def test_site_renders_in_headless_chromium(site):
    from playwright.sync_api import sync_playwright

    out, _ = site
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page()
        page.goto((out / "index.html").as_uri())
        links = page.eval_on_selector_all("ol.chapters a", "els => els.map(e => e.getAttribute('href'))")
        assert links == [f"{nb.stem}.html" for nb in NOTEBOOKS]
        for nb_path in NOTEBOOKS:
            nb = nbformat.read(nb_path, as_version=4)
            page.goto((out / f"{nb_path.stem}.html").as_uri(), wait_until="load")
            shown = page.eval_on_selector_all(
                ".jp-OutputArea-output img", "els => els.filter(e => e.complete && e.naturalWidth > 0).length")
            assert shown == _images(nb) > 0, nb_path.name  # every figure decoded and displayed
            errors = page.locator('[data-mime-type="application/vnd.jupyter.stderr"]').count()
            assert errors == 0, f"{nb_path.name} shows {errors} error/stderr outputs"
            assert page.locator("nav.pefttutor-nav a[href='index.html']").count() == 1
            assert "Traceback" not in page.inner_text("body")
        browser.close()
