"""Blog outputs: the figures index, and the Sphinx site (`make site`) checked in headless Chromium offline."""

import re
import shutil
import subprocess
import sys

import nbformat
import pytest

from pefttutor import plots, publish
from browser import CHROMIUM, REQUIRED, SKIP_REASON, offline_page
from pefttutor.config import repo_root

NOTEBOOKS = publish.notebooks()


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
    """The site as `make site` builds it from site/ (nothing executed), any Sphinx warning an error."""
    out = tmp_path_factory.mktemp("site") / "html"
    done = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-q", "-W", "--keep-going",
                           str(repo_root() / "site"), str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


CHAPTERS = [f"notebooks/{nb.stem}.html" for nb in NOTEBOOKS]


def test_site_lists_the_chapters_in_the_blogs_order_and_ships_mathjax(site):
    index = (site / "index.html").read_text(encoding="utf-8")
    toctree = index[index.index('class="toctree-wrapper'):]
    toctree = toctree[:toctree.index("</ul>")]
    assert re.findall(r'href="([^"]+)"', toctree) == CHAPTERS
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for page in ["index.html", "search.html", *CHAPTERS]:
        remote = re.findall(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="((?:https?:)?//[^"]*)"',
                            (site / page).read_text(encoding="utf-8"))
        assert remote == [], (page, remote)


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


# After MathJax's first typeset: what a chapter page shows. Visible prose is the article's text outside
# code and typeset math, where any TeX delimiter left would be an equation MathJax did not render.
_PAGE = """async () => {
  if (window.MathJax && MathJax.startup) await MathJax.startup.promise;
  await document.fonts.ready;  // MathJax's fonts too: every request done before the next page
  const article = document.querySelector("article.bd-article");
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  let prose = "";
  for (let n; (n = walker.nextNode());)
    if (!n.parentElement.closest("pre, code, script, style, mjx-container")) prose += n.data;
  const hrefs = sel => [...document.querySelectorAll(sel)].map(a => a.getAttribute("href"));
  return {
    prose,
    math: article.querySelectorAll(".math").length,
    untypeset: [...article.querySelectorAll(".math")].filter(e => !e.querySelector("mjx-container")).length,
    mathErrors: article.querySelectorAll("mjx-merror").length,
    images: [...document.images].map(i => [i.getAttribute("src"), i.complete && i.naturalWidth > 0]),
    outputImages: article.querySelectorAll(".cell_output img").length,
    errorOutputs: article.querySelectorAll(".cell_output .stderr, .cell_output .traceback").length,
    nav: [...document.querySelectorAll("nav.bd-docs-nav a.reference.internal")].map(a => a.textContent.trim()),
    toc: hrefs("#pst-page-toc-nav a"),
    sections: [...article.querySelectorAll("section > h2")].map(h => "#" + h.parentElement.id),
    prev: hrefs("a.left-prev"),
    next: hrefs("a.right-next"),
  };
}"""
_RAW_TEX = re.compile(r"\$\$|\$[^$\s][^$]*\$|\\\(|\\\)|\\\[|\\\]|\\begin\{")


@pytest.mark.skipif(CHROMIUM is None and not REQUIRED, reason=SKIP_REASON)
def test_site_in_headless_chromium_typesets_math_shows_figures_and_searches_offline(site):
    pages = {}
    with offline_page(site) as (base, page, seen):
        for chapter in CHAPTERS:
            page.goto(base + chapter, wait_until="load")
            pages[chapter] = page.evaluate(_PAGE)
        page.goto(f"{base}search.html?q=LoRA", wait_until="load")
        page.wait_for_function("document.querySelector('#search-results .search-summary')"
                               "?.textContent.includes('Search finished')", timeout=30_000)
        hits = page.eval_on_selector_all("#search-results ul.search li a", "els => els.map(e => e.href)")
    outside, requests, broken, script_errors = seen["outside"], seen["requests"], seen["broken"], seen["errors"]
    assert outside == [], f"requests that would leave the machine: {outside}"
    assert requests and all(u.startswith(base) for u in requests)
    assert broken == [] and script_errors == [], (broken, script_errors)
    titles = [publish.title(nb) for nb in NOTEBOOKS]
    for i, (nb_path, chapter) in enumerate(zip(NOTEBOOKS, CHAPTERS)):
        shown, name = pages[chapter], nb_path.name
        assert shown["untypeset"] == shown["mathErrors"] == 0, (name, shown["untypeset"], shown["mathErrors"])
        assert not _RAW_TEX.findall(shown["prose"]), (name, _RAW_TEX.findall(shown["prose"])[:5])
        assert all(ok for _, ok in shown["images"]), (name, [src for src, ok in shown["images"] if not ok])
        assert shown["outputImages"] == _images(nbformat.read(nb_path, as_version=4)), name
        assert shown["errorOutputs"] == 0, name
        assert shown["nav"] == titles, name  # every chapter in the sidebar, in the blog's order
        assert shown["sections"] and set(shown["sections"]) <= set(shown["toc"]), name  # the chapter's own contents
        assert shown["prev"] == (["../index.html"] if i == 0 else [f"{NOTEBOOKS[i - 1].stem}.html"]), name
        assert shown["next"] == ([f"{NOTEBOOKS[i + 1].stem}.html"] if i + 1 < len(NOTEBOOKS) else []), name
    assert sum(shown["math"] for shown in pages.values()) > 150  # the notebooks' equations, all typeset above
    assert any(h.startswith(base + "notebooks/05_lora.html") for h in hits), hits
