"""The blog post's Hugo page bundle: built from the committed notebooks, then by a real Hugo, then
opened in headless Chromium. Fast: nothing is executed, the notebooks' committed outputs are read."""

import datetime
import html
import json
import re
import shutil
import subprocess

import nbformat
import pytest

from pefttutor import blog, plots, publish
from browser import CHROMIUM, REQUIRED, SKIP_REASON, offline_page
from pefttutor.config import repo_root

NOTEBOOKS = blog.post_notebooks()
FIGURES = repo_root() / "figures"
HUGO = shutil.which("hugo")
FIELDS = {"title": str, "date": datetime.date, "permalink": str, "summary": str, "math": bool, "showToc": bool}
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
_UNESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")


def _norm(text: str) -> str:
    return " ".join(text.split())


def _split(text: str) -> tuple[dict, str]:
    """(front matter, body) of index.md: PyYAML where installed, else its simple `key: value` lines."""
    assert text.startswith("---\n"), "index.md must start with YAML front matter"
    head, body = text[4:].split("\n---\n", 1)
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        return yaml.safe_load(head), body
    meta = {}
    for line in head.splitlines():
        key, value = line.split(": ", 1)
        if value in ("true", "false"):
            meta[key] = value == "true"
        elif value.startswith('"'):
            meta[key] = json.loads(value)
        else:
            meta[key] = datetime.date.fromisoformat(value)
    return meta, body


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The CLI's bundle, built once: (bundle folder, front matter, Markdown body)."""
    out = tmp_path_factory.mktemp("blog")
    blog.main(["--out", str(out)])
    folder = out / blog.SLUG
    meta, body = _split((folder / "index.md").read_text(encoding="utf-8"))
    return folder, meta, body


def test_front_matter_has_exactly_the_seed_posts_fields(bundle):
    _, meta, _ = bundle
    assert list(meta) == list(FIELDS)
    for key, kind in FIELDS.items():
        assert type(meta[key]) is kind, f"{key}: {meta[key]!r} is not {kind.__name__}"
    assert meta["math"] is True and meta["showToc"] is True
    assert meta["title"].strip() and meta["summary"].strip()
    assert meta["permalink"].startswith("/") and meta["permalink"].endswith("/")
    try:
        git = subprocess.run(["git", "log", "-1", "--format=%cs", "--", *map(str, NOTEBOOKS)], cwd=repo_root(),
                             capture_output=True, text=True, check=True).stdout.strip()
        expected = datetime.date.fromisoformat(git)
    except (OSError, subprocess.SubprocessError, ValueError):
        expected = datetime.date.today()
    assert meta["date"] == expected


def test_date_is_today_where_git_cannot_say(tmp_path):
    (tmp_path / "01_x.ipynb").write_text("{}")
    assert blog.post_date([tmp_path / "01_x.ipynb"]) == datetime.date.today()


def test_sections_in_the_blogs_order(bundle):
    _, _, body = bundle
    sections = [line[3:] for line in body.splitlines() if line.startswith("## ")]
    titles = [re.sub(r"^\d+\s*·\s*", "", publish.title(nb)) for nb in NOTEBOOKS]
    assert sections == titles  # one `##` per notebook: intro, prompts, prefix, adapters, LoRA, conclusion
    assert [nb.stem for nb in NOTEBOOKS] == ["01_introduction", "02_hard_vs_soft_prompts", "03_prefix_tuning",
                                             "04_adapters", "05_lora", "06_conclusion"]
    assert not re.search(r"^# ", body, re.M), "the theme prints the title; the body has no h1"
    assert "\n### 1 · The low-rank idea\n" in body and "\n#### Rank sweep" in body  # demoted one level
    assert "\n### 5 · LLaMA-Adapter: prompts behind a zero gate\n" in body


def test_every_figure_is_referenced_and_in_the_bundle(bundle):
    folder, _, body = bundle
    refs = _IMAGE.findall(body)
    assert len(refs) == len(set(refs))
    for ref in refs:
        assert "/" not in ref and (folder / ref).is_file(), ref
    expected = [n for nb in NOTEBOOKS for n in publish.figure_names(nb)
                if any((FIGURES / f"{n}.{e}").exists() for e in ("svg", "png"))]
    assert [r.rsplit(".", 1)[0] for r in refs] == expected  # every one, in the notebooks' order
    assert all(r.endswith(".svg") for r in refs if (FIGURES / r.replace(".png", ".svg")).exists())
    assert sorted(p.name for p in folder.iterdir()) == sorted(refs + ["index.md"])
    for ref in refs:
        assert (folder / ref).read_bytes() == (FIGURES / ref).read_bytes()


def test_no_code_no_exercises_no_notebook_boilerplate(bundle):
    _, _, body = bundle
    for text in (".check(", "Exercise 1", "Exercises", "ex.hint", "answer = ", "PEFTTUTOR_", "tests/test_",
                 "widget", "live notebook", "fast mode", "**Objectives**", "import torch", "def ", "Traceback"):
        assert text not in body, text
    assert "Lester et al." in body and "Houlsby" in body  # the narrative is there ...
    assert "| --- |" in body  # ... and the small result tables


def test_math_is_escaped_for_goldmark_and_unescapes_to_the_notebooks_latex():
    text = r"A $W_0 x + \Delta W x$, `$code_span$`, $5 and $6, and $$a_{1} \\ \{b\}$$ end."
    out = blog.protect_math(text)
    assert r"$W\_0 x \+ \\Delta W x$" in out
    assert "`$code_span$`" in out and "$5 and $6" in out  # code and prices are not math
    assert _UNESCAPE.sub(r"\1", out) == text  # Goldmark prints back exactly what the notebook wrote


def test_tables_fill_rowspans_and_drop_a_default_index():
    source = """<table class="dataframe"><thead><tr><th></th><th></th><th>n</th></tr>
    <tr><th>P</th><th>MLP</th><th></th></tr></thead><tbody>
    <tr><th rowspan="2">1</th><th>False</th><td>11520</td></tr><tr><th>True</th><td>6 | 7</td></tr></tbody></table>"""
    assert blog.html_table(source) == ("| P | MLP | n |\n| --- | --- | --- |\n| 1 | False | 11520 |\n"
                                       "| 1 | True | 6 \\| 7 |")
    plain = ('<table class="dataframe"><thead><tr><th></th><th>a</th></tr></thead>'
             '<tbody><tr><th>0</th><td>x</td></tr></tbody></table>')
    assert blog.html_table(plain) == "| a |\n| --- |\n| x |"
    assert blog.html_table("<table><tr><td>not pandas</td></tr></table>") is None


def test_a_section_skips_exercises_and_falls_back_to_png(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 07 · Demo\n\nProse with $x_1$.\n\n## 1 · Part\n\nMore."),
                nbformat.v4.new_code_cell('plots.show(fig, "07_only-png", caption="c")'),
                nbformat.v4.new_markdown_cell("## Exercises\n\n**Exercise 1.** Do it."),
                nbformat.v4.new_code_cell('ex1.check(answer)\nplots.show(fig, "07_in-exercise")'),
                nbformat.v4.new_markdown_cell("## Summary\n\nDone.")]
    path = tmp_path / "07_demo.ipynb"
    nbformat.write(nb, path)
    fig, ax = plots.figure()
    ax.plot([0, 1])
    plots.save(fig, "07_only-png", folder=tmp_path)
    (tmp_path / "07_only-png.svg").unlink()
    text, shown = blog.section(path, tmp_path, first_figure=3)
    assert shown == [tmp_path / "07_only-png.png"]
    assert text.startswith("## Demo\n\nProse with $x\\_1$.\n\n### 1 · Part\n\nMore.\n\n"
                           "![07\\_only-png](07_only-png.png)")
    assert "*Figure 3. 07\\_only-png*" in text and "### Summary\n\nDone." in text
    assert "Exercise" not in text and "07_in-exercise" not in text
    nb.cells.append(nbformat.v4.new_code_cell('plots.show(fig, "07_missing")'))
    nbformat.write(nb, path)
    with pytest.raises(blog.BlogError, match="07_missing.*make figures"):
        blog.section(path, tmp_path)


# --- a real Hugo build, and the page in headless Chromium

_BASEOF = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ .Title }}</title></head>
<body>{{ block "main" . }}{{ end }}</body></html>
"""
_SINGLE = """{{ define "main" }}<h1>{{ .Title }}</h1>
<nav id="toc">{{ .TableOfContents }}</nav>
<article>{{ .Content }}</article>{{ end }}
"""
_LIST = """{{ define "main" }}{{ range .Site.RegularPages }}
<a href="{{ .RelPermalink }}">{{ .Title }}</a>{{ end }}{{ end }}
"""


@pytest.fixture(scope="module")
def hugo_site(bundle, tmp_path_factory):
    """A minimal Hugo site (no theme, default Goldmark, raw HTML off) with the bundle in
    content/posts/, built; returns (public folder, the post's folder in it)."""
    if HUGO is None:
        pytest.fail("hugo is not installed, and PEFTTUTOR_REQUIRE_BROWSER=1 asks for this test (apt-get install hugo)")
    folder, _, _ = bundle
    site = tmp_path_factory.mktemp("hugo")
    (site / "config.toml").write_text('baseURL = "http://127.0.0.1/"\ntitle = "test"\n'
                                      'disableKinds = ["taxonomy", "term", "RSS", "sitemap"]\n')
    layouts = site / "layouts" / "_default"
    layouts.mkdir(parents=True)
    for name, text in (("baseof.html", _BASEOF), ("single.html", _SINGLE), ("list.html", _LIST)):
        (layouts / name).write_text(text)
    shutil.copytree(folder, site / "content" / "posts" / blog.SLUG)
    done = subprocess.run([HUGO, "--source", str(site)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ERROR" not in done.stdout + done.stderr, done.stdout + done.stderr
    return site / "public", site / "public" / "posts" / blog.SLUG


needs_hugo = pytest.mark.skipif(HUGO is None and not REQUIRED,
                                reason="no hugo here (CI installs it and sets PEFTTUTOR_REQUIRE_BROWSER=1)")


@needs_hugo
def test_hugo_builds_the_page_with_figures_toc_and_math_intact(bundle, hugo_site):
    folder, meta, body = bundle
    _, page = hugo_site
    source = (page / "index.html").read_text(encoding="utf-8")
    for ref in _IMAGE.findall(body):
        assert (page / ref).read_bytes() == (folder / ref).read_bytes(), ref
        assert f'src="{ref}"' in source
    toc = source[source.index('<nav id="toc">'):source.index("<article>")]
    for title in re.findall(r"^## (.+)$", body, re.M):
        assert title in html.unescape(toc), title
    text = _norm(html.unescape(source))
    assert _norm(meta["title"]) in text
    for tex in (r"$$h = W_0 x + \Delta W x = W_0 x + \tfrac{\alpha}{r}\, B A\, x,",  # notebook 05
                r"$r(d_\text{in} + d_\text{out})$", r"$\Delta W = W_\text{finetuned} - W_0$",
                r"$\sigma \in \{10^{-3}, 10^{-2}, 10^{-1}, 1\}$",  # in a heading: \{ \} kept
                r"\underbrace{4}_{\text{weight}} + \underbrace{4}_{\text{gradient}}"):  # }_{ is no emphasis
        assert _norm(tex) in text, tex
    # every equation in the post reaches the HTML as the notebooks wrote it
    notebook_math = _norm(" ".join(c.source for nb in NOTEBOOKS for c in nbformat.read(nb, as_version=4).cells
                                   if c.cell_type == "markdown"))
    equations = [_UNESCAPE.sub(r"\1", m.group(0)) for m in blog._MATH.finditer(body)]
    assert len(equations) > 150
    for tex in equations:
        assert _norm(tex) in notebook_math, tex
        assert _norm(tex) in text, tex
    article = source[source.index("<article>"):]
    assert not re.search(r"<(em|strong)>[^<]*\\", article), "emphasis inside math"


@needs_hugo
@pytest.mark.skipif(CHROMIUM is None and not REQUIRED, reason=SKIP_REASON)
def test_page_shows_every_figure_in_headless_chromium_offline(bundle, hugo_site):
    _, _, body = bundle
    public, _ = hugo_site
    with offline_page(public) as (base, page, seen):
        page.goto(f"{base}posts/{blog.SLUG}/", wait_until="load")
        images = page.eval_on_selector_all(
            "article img", "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth > 0])")
        headings = page.eval_on_selector_all("article h2", "els => els.map(e => e.textContent)")
    outside, requests = seen["outside"], seen["requests"]
    assert [src for src, _ in images] == _IMAGE.findall(body)
    assert all(ok for _, ok in images), [src for src, ok in images if not ok]
    assert headings == re.findall(r"^## (.+)$", body, re.M)
    assert outside == [] and requests and all(u.startswith(base) for u in requests), requests
