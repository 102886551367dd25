"""The notebooks' widgets in a real JupyterLab, driven in headless Chromium as a reader would.

A JupyterLab server (this venv's, its `python3` kernel, fast mode) serves a temporary copy of
notebooks/. Each test opens a notebook, clears its outputs, runs it in the kernel it just started
(Run > Run All Cells; for 03 and 05, Run All Above Selected Cell, up to the widget), then moves the
widget's controls (picks dropdown options, types into a slider's readout, presses keys on a
slider's handle, clicks toggle buttons) and checks that the rendered text shows the numbers the
package's own functions give (computed here; for 03's prefix attention viewer, in the notebook's
own kernel beside the widget, since they need its trained model), that the static picture is
redrawn after every move, and that no script error was raised and no request left the lab. One
screenshot per widget goes to build/test-artifacts/lab-widgets/.

(Not "Restart Kernel and Run All Cells": restarting a kernel that has just started can make
JupyterLab itself reject a pending kernel_info request, an uncaught error that is no widget's.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from browser import CHROMIUM, REQUIRED, SKIP_REASON, local_page
from pefttutor import calculator as calc
from pefttutor.config import repo_root
from pefttutor.study import experiments, report
from pefttutor.widgets.calculator import gigabytes

pytestmark = pytest.mark.skipif(CHROMIUM is None and not REQUIRED, reason=SKIP_REASON)

ROOT = repo_root()
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "build" / "test-artifacts" / "lab-widgets"
TOKEN = "pefttutor-lab-widgets-test"
RUN_TIMEOUT_MS = 180_000  # a whole notebook from a fresh kernel, in fast mode, on a busy 2-core CPU
STEP_TIMEOUT_MS = 30_000  # one control moved: the kernel recomputes and redraws
VIEWPORT = {"width": 1400, "height": 1000}
SETTINGS = {  # the lab's user settings (a fresh, temporary settings folder)
    # every cell attached to the page, so every prompt and output can be read wherever it is scrolled
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    # no news and no update check: nothing would be allowed out anyway
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}


# --- the JupyterLab server ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback only)
        return response.read()


def _descendants(pid: int) -> list:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing, or the server already gone
        return []


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free loopback port with a fixed token, whose root is a copy of
    notebooks/; yields its base URL. Shut down (kernels included) at the end, also on failure."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    home = {name: tmp / name for name in ("config", "data", "runtime", "settings", "workspaces")}
    for folder in home.values():
        folder.mkdir()
    for name, values in SETTINGS.items():
        path = home["settings"] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_"))}
    env.update(PEFTTUTOR_FAST="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               # fresh user folders: no kernelspec, setting or workspace of this machine's user applies
               JUPYTER_CONFIG_DIR=str(home["config"]), JUPYTER_DATA_DIR=str(home["data"]),
               JUPYTER_RUNTIME_DIR=str(home["runtime"]), JUPYTERLAB_SETTINGS_DIR=str(home["settings"]),
               JUPYTERLAB_WORKSPACES_DIR=str(home["workspaces"]))
    # The kernel notebooks ask for, python3, must be this venv's (its argv "python" is run as the
    # server's own interpreter, sys.executable, by jupyter_client).
    specs = json.loads(subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"], env=env,
                                      capture_output=True, text=True, check=True, timeout=60).stdout)["kernelspecs"]
    assert "python3" in specs, specs
    assert Path(specs["python3"]["resource_dir"]).resolve().is_relative_to(Path(sys.prefix).resolve()), specs

    port = _free_port()
    base = f"http://127.0.0.1:{port}/"
    args = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.getuid() == 0:
        args.append("--allow-root")
    log = (tmp / "lab.log").open("wb")
    server = subprocess.Popen(args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail() -> str:
        log.flush()
        return (tmp / "lab.log").read_text(errors="replace")[-3000:]

    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, f"JupyterLab exited with {server.returncode}:\n{log_tail()}"
            assert time.monotonic() < deadline, f"JupyterLab did not answer within 90 s:\n{log_tail()}"
            with contextlib.suppress(OSError):
                if "started" in json.loads(_get(f"{base}api/status?token={TOKEN}")):
                    break
            time.sleep(0.5)
        yield {"base": base, "root": root, "log": log_tail, "runtime": home["runtime"]}
    finally:
        children = _descendants(server.pid)  # its kernels, which run in sessions of their own
        if server.poll() is None:
            with contextlib.suppress(OSError):  # shuts every kernel down, then the server
                urllib.request.urlopen(urllib.request.Request(f"{base}api/shutdown?token={TOKEN}", method="POST"),
                                       timeout=10).close()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait(timeout=10)
        for child in children:  # normally gone already
            with contextlib.suppress(Exception):
                child.terminate()
                child.wait(timeout=10)
        log.close()


# --- the notebook in the lab ----------------------------------------------------------------------


def _menu(page, top: str, item: str) -> None:
    page.locator("#jp-MainMenu").get_by_role("menuitem", name=top, exact=True).click()
    page.locator(".lm-Menu").get_by_role("menuitem", name=item, exact=True).click()


_PROMPTS = "[...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim())"
_STATUS = "document.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset.status"


def _wait_for_run(page, n_run: int, lab) -> None:
    """Wait until the kernel has run and is idle: nothing queued, the first cell numbered. Then the
    first `n_run` code cells must carry 1, 2, ... (a fresh kernel, top to bottom) and the rest none."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"""() => {{ const p = {_PROMPTS};
            return p.length > 0 && p[0] === '[1]:' && !p.some(t => t.includes('*')) && {_STATUS} === 'idle'; }}""",
                               timeout=RUN_TIMEOUT_MS, polling=500)
    except PlaywrightTimeout:
        dialogs = page.locator(".jp-Dialog").all_inner_texts()
        pytest.fail(f"the notebook did not finish within {RUN_TIMEOUT_MS / 1000:.0f} s: "
                    f"prompts {page.evaluate(_PROMPTS)}, "
                    f"kernel {page.evaluate(_STATUS)}, dialogs {dialogs}\nserver log: {lab['log']()[-1500:]}")
    prompts = page.evaluate(_PROMPTS)
    expected = [f"[{i + 1}]:" for i in range(n_run)] + ["[ ]:"] * (len(prompts) - n_run)
    if prompts != expected:
        stderr = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"  # errors too
        errors = page.locator(stderr).all_text_contents()
        pytest.fail(f"the notebook did not run through in the lab: prompts {prompts}\n"
                    f"stderr / errors: {[e[-1500:] for e in errors]}\nserver log: {lab['log']()[-1500:]}")


def _wait_for_kernel(page, lab, notebook: str) -> None:
    """Wait until the notebook's kernel is this venv's python3 (its display name in the toolbar and the
    status bar, its name on the server), started and idle.

    (Waits here are Playwright's, never time.sleep: the page's requests pass through the route of
    tests/browser.py, which Playwright's sync API serves only while a call of it is waiting.)"""
    _expect(page.locator(".jp-NotebookPanel-toolbar [data-jp-item-name='kernelName']")).to_have_text(
        "Python 3 (ipykernel)", timeout=RUN_TIMEOUT_MS)
    _expect(page.locator("#jp-main-statusbar").get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(
        timeout=RUN_TIMEOUT_MS)
    page.wait_for_function(f"{_STATUS} === 'idle'", timeout=RUN_TIMEOUT_MS, polling=250)
    deadline = time.monotonic() + STEP_TIMEOUT_MS / 1000
    while True:
        sessions = json.loads(_get(f"{lab['base']}api/sessions?token={TOKEN}"))
        if any(notebook in (s["path"], s["name"]) and (s["kernel"]["name"], s["kernel"]["execution_state"])
               == ("python3", "idle") for s in sessions):  # (the path is a UUID while the kernel starts)
            return
        assert time.monotonic() < deadline, f"no idle python3 kernel for {notebook} on the server: {sessions}"
        page.wait_for_timeout(250)


@pytest.fixture(scope="module")
def lab_browser(lab):
    """Headless Chromium that may load only from the lab: `(page, seen)` (tests/browser.py)."""
    with local_page(lab["base"], viewport=VIEWPORT) as (page, seen):
        yield page, seen


@contextlib.contextmanager
def _opened(lab, lab_browser, notebook: str):
    """The notebook open in the lab in a page and workspace of its own, its kernel idle and its outputs
    cleared; yields `(page, seen)`, `seen` emptied first."""
    first, seen = lab_browser
    for found in seen.values():
        found.clear()
    page = first.context.new_page()
    try:
        page.set_default_timeout(STEP_TIMEOUT_MS)
        page.goto(f"{lab['base']}lab/workspaces/{Path(notebook).stem}/tree/{notebook}?token={TOKEN}")
        page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=RUN_TIMEOUT_MS)
        _wait_for_kernel(page, lab, notebook)
        _menu(page, "Edit", "Clear Outputs of All Cells")
        page.wait_for_function(f"{_PROMPTS}.every(t => t === '[ ]:')", polling=250)
        yield page, seen
    finally:
        page.close()


def _widget_cell(page, label: str):
    """The one cell whose output shows a widget control labelled `label`."""
    labelled = re.compile(f"^{re.escape(label)}$")
    cell = page.locator(".jp-Notebook .jp-CodeCell").filter(
        has=page.locator(".jp-OutputArea .jupyter-widgets label.widget-label", has_text=labelled))
    cell.first.wait_for()
    assert cell.count() == 1, f"{cell.count()} cells show a widget labelled {label!r}"
    return cell


def _control(cell, kind: str, label: str):
    """A control of the widget in `cell` by its class (widget-dropdown, widget-slider, ...) and label."""
    return cell.locator(f".{kind}").filter(
        has=cell.page.locator("label.widget-label", has_text=re.compile(f"^{re.escape(label)}$")))


def _type_into_readout(slider, value: int) -> None:
    """Type a value into the slider's readout and press Enter, as a reader would."""
    readout = slider.locator(".widget-readout")
    readout.click()
    readout.fill(str(value))
    readout.press("Enter")
    _expect(slider.locator(".noUi-handle")).to_have_attribute("aria-valuetext", str(value))


def _press_on_handle(slider, key: str, times: int, value: int) -> None:
    """Focus the slider's handle and press `key` (ArrowLeft, ArrowRight, Home, End) `times` times."""
    handle = slider.locator(".noUi-handle")
    handle.focus()
    for _ in range(times):
        handle.press(key)
    _expect(handle).to_have_attribute("aria-valuetext", str(value))


def _expect(locator):
    from playwright.sync_api import expect

    return expect(locator)


class Picture:
    """The widget's static picture (an <img> of a PNG data URL): each step must redraw it, and raise
    no script error (`seen`, tests/browser.py)."""

    def __init__(self, img, seen):
        self.img, self.seen = img, seen
        self.src = self._loaded_src()

    def _loaded_src(self) -> str:
        self.img.wait_for()
        self.img.page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=self.img.element_handle())
        src = self.img.get_attribute("src")
        assert src.startswith("data:image/png;base64,") or src.startswith("blob:"), src[:60]
        return src

    def redrawn(self, what: str) -> None:
        previous = self.src
        try:
            _expect(self.img).not_to_have_attribute("src", previous)
        except AssertionError as e:
            raise AssertionError(f"the picture was not redrawn after {what}") from e
        self.src = self._loaded_src()
        _no_script_errors(self.seen, f"after {what}")


def _no_script_errors(seen, when: str = "") -> None:
    assert seen["errors"] == [], f"uncaught script errors {when}: {seen['errors']}"
    assert seen["console"] == [], f"console errors {when}: {seen['console']}"
    assert seen["outside"] == [], f"requests that would leave the machine {when}: {seen['outside']}"


def _screenshot(cell, name: str) -> Path:
    """The widget's outputs (controls, text, picture) as build/test-artifacts/lab-widgets/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    cell.locator(".jp-OutputArea").screenshot(path=str(path))
    assert path.stat().st_size > 10_000, path
    return path


def _code_cells(lab, notebook: str) -> list[str]:
    return [c.source for c in nbformat.read(lab["root"] / notebook, as_version=4).cells if c.cell_type == "code"]


def _widget_position(lab, notebook: str, is_widget) -> tuple[int, int]:
    """(the widget cell's index among the code cells, the index among all cells of the cell below it)."""
    widget_at = next(i for i, s in enumerate(_code_cells(lab, notebook)) if is_widget(s))
    cells = nbformat.read(lab["root"] / notebook, as_version=4).cells
    below = [i for i, c in enumerate(cells) if c.cell_type == "code"][widget_at] + 1
    assert below < len(cells), f"nothing below the widget of {notebook}"
    return widget_at, below


def _run_up_to_widget(page, lab, widget_at: int, below: int) -> None:
    """Run > Run All Above Selected Cell, on the cell below the widget's: the notebook up to its widget."""
    page.locator(".jp-Notebook .jp-Cell").nth(below).locator(".jp-InputPrompt").click()
    _menu(page, "Run", "Run All Above Selected Cell")
    _wait_for_run(page, widget_at + 1, lab)


# --- notebook 06: the calculator and the learning curves ------------------------------------------


@pytest.fixture(scope="module")
def conclusion(lab, lab_browser):
    """Notebook 06 run top to bottom in the kernel it opened with (Run > Run All Cells)."""
    notebook = "06_conclusion.ipynb"
    with _opened(lab, lab_browser, notebook) as (page, seen):
        _menu(page, "Run", "Run All Cells")
        _wait_for_run(page, len(_code_cells(lab, notebook)), lab)
        _expect(page.locator(".jp-Notebook .jp-CodeCell").first.locator(".jp-OutputArea")).to_contain_text("mode: fast")
        _no_script_errors(seen)
        yield page, seen


def _calculator_expected(arch, method, dtype="bf16", optimizer="adamw", batch_size=4, seq_len=512, **hparams):
    """The heading and the table the calculator should show, from `pefttutor.calculator` itself."""
    setting = {"dtype": dtype, "optimizer": optimizer, "batch_size": batch_size, "seq_len": seq_len}
    trainable, total = calc.peft_params(arch, method, **hparams), calc.total_params(arch)
    memory = calc.training_memory(arch, method, **setting, **hparams)
    full = calc.training_memory(arch, "full", **setting)
    cells = ["", method, "full finetuning",
             "trainable parameters", f"{trainable:,} ({100 * trainable / total:.4g}%)", f"{total:,} (100%)"]
    for part in memory:
        cells += [f"{part}, GB", gigabytes(memory[part]), gigabytes(full[part])]
    return f"{method} on {arch}, {dtype}, {optimizer}, batch {batch_size} x {seq_len} tokens.", cells


def test_06_calculator_panel_follows_its_controls_in_jupyterlab(conclusion):
    page, seen = conclusion
    cell = _widget_cell(page, "model")
    text = cell.locator(".jp-RenderedHTML").filter(has=page.locator("table"))
    picture = Picture(cell.locator(".jp-RenderedImage img"), seen)

    def shows(heading, cells):
        _expect(text).to_contain_text(heading)
        _expect(text.locator("th, td")).to_have_text(cells)

    lora = calc.HPARAMS["lora"]
    shows(*_calculator_expected("llama-7b", "lora", r=lora["r"], targets=lora["targets"]))  # as the cell made it

    _control(cell, "widget-dropdown", "model").locator("select").select_option("gpt3-175b")
    shows(*_calculator_expected("gpt3-175b", "lora", r=lora["r"], targets=lora["targets"]))
    picture.redrawn("choosing gpt3-175b")

    rank = _control(cell, "widget-slider", "rank r")
    _type_into_readout(rank, 4)
    heading, cells = _calculator_expected("gpt3-175b", "lora", r=4, targets=("q", "v"))
    assert cells[4].startswith(f"{4 * 4_718_592:,} ")  # the LoRA paper's 4.7M per rank on GPT-3's Wq, Wv
    shows(heading, cells)
    picture.redrawn("typing r = 4")

    _press_on_handle(rank, "ArrowRight", 2, 6)
    shows(*_calculator_expected("gpt3-175b", "lora", r=6, targets=("q", "v")))
    picture.redrawn("pressing ArrowRight on r")

    _control(cell, "widget-select-multiple", "targets").locator("select").select_option(["q", "k", "v", "o"])
    shows(*_calculator_expected("gpt3-175b", "lora", r=6, targets=("q", "k", "v", "o")))
    picture.redrawn("choosing targets q, k, v, o")

    _type_into_readout(_control(cell, "widget-slider", "tokens/seq"), 2048)
    shows(*_calculator_expected("gpt3-175b", "lora", seq_len=2048, r=6, targets=("q", "k", "v", "o")))
    picture.redrawn("typing 2048 tokens per sequence")

    _control(cell, "widget-dropdown", "method").locator("select").select_option("adapters")
    adapters = calc.HPARAMS["adapters"]
    shows(*_calculator_expected("gpt3-175b", "adapters", seq_len=2048, **adapters))
    picture.redrawn("choosing adapters")
    _expect(rank).to_be_hidden()  # only the chosen method's settings are shown
    _expect(_control(cell, "widget-slider", "bottleneck m")).to_be_visible()

    _screenshot(cell, "06_conclusion-calculator_panel")
    _no_script_errors(seen)


def _curve_methods(task: str) -> dict[str, int]:
    """The study's final methods of `task` that have learning curves, in the study's order, with their
    number of runs (seeds), from the committed results."""
    runs = [r for r in report.runs(task) if r["loss_curve"]]
    names = dict.fromkeys(e["name"] for e in experiments.experiments() if e["group"] == "final" and e["task"] == task)
    return {n: k for n in names if (k := sum(r["config"]["name"] == n for r in runs))}


def _caption(task: str, n: int) -> str:
    return f"{task}: {n} run{'s' * (n != 1)} from results/{task}/final/."


def test_06_learning_curves_follow_their_controls_in_jupyterlab(conclusion, lab):
    if not any("learning_curves(" in source for source in _code_cells(lab, "06_conclusion.ipynb")):
        pytest.skip("notebook 06 does not show widgets.learning_curves(...) (yet)")
    page, seen = conclusion
    cell = _widget_cell(page, "task")
    caption = cell.locator(".jp-RenderedHTML").filter(has_text="from results/")
    picture = Picture(cell.locator(".jp-RenderedImage img"), seen)
    task = _control(cell, "widget-dropdown", "task").locator("select")
    methods = _control(cell, "widget-select-multiple", "methods").locator("select")
    tasks = list(dict.fromkeys(e["task"] for e in experiments.experiments() if e["group"] == "final"))
    by_task = {t: _curve_methods(t) for t in tasks if _curve_methods(t)}
    _expect(task.locator("option")).to_have_text(list(by_task))

    def shows(task_name, chosen):
        _expect(methods.locator("option")).to_have_text(list(by_task[task_name]))
        _expect(methods).to_have_values(chosen)
        _expect(caption).to_contain_text(_caption(task_name, sum(by_task[task_name][m] for m in chosen)))

    def selected():
        return methods.evaluate("s => [...s.selectedOptions].map(o => o.value)")

    first = list(by_task)[0]
    chosen = selected()  # what the notebook asked for
    assert chosen and set(chosen) <= set(by_task[first]), chosen
    shows(first, chosen)

    other = list(by_task)[1]
    task.select_option(other)  # its own methods: still valid choices kept, else the notebook's or the first few
    still = [m for m in chosen if m in by_task[other]]
    _expect(methods.locator("option")).to_have_text(list(by_task[other]))
    if still:
        shows(other, still)
    else:  # what the notebook asked for that the task has, else its first few
        _expect(caption).to_contain_text(f"{other}: ")  # redrawn: the selection is final
        assert selected(), "no method selected"
        shows(other, selected())
    picture.redrawn(f"choosing {other}")

    pick = list(by_task[other])[:2]
    methods.select_option(pick)
    shows(other, pick)
    picture.redrawn(f"choosing {pick}")

    smooth = _control(cell, "widget-slider", "mean of")
    _expect(smooth).to_be_hidden()  # the smoothing is for the train loss only
    cell.locator(".widget-toggle-buttons").get_by_role("button", name="train loss", exact=True).click()
    _expect(smooth).to_be_visible()
    picture.redrawn("showing the train loss")
    _press_on_handle(smooth, "End", 1, 100)
    picture.redrawn("smoothing over 100 steps")

    cell.locator(".widget-toggle-buttons").get_by_role("button", name="training time (estimate)", exact=True).click()
    _expect(caption).to_contain_text("Training time is estimated as step x the run's median step time")
    picture.redrawn("plotting against the estimated time")

    task.select_option(first)
    kept = [m for m in pick if m in by_task[first]]
    _expect(methods.locator("option")).to_have_text(list(by_task[first]))
    if not kept:
        _expect(caption).to_contain_text(f"{first}: ")
    shows(first, kept or selected())
    picture.redrawn(f"choosing {first} again")

    _screenshot(cell, "06_conclusion-learning_curves")
    _no_script_errors(seen)


# --- notebook 05: the SVD explorer --------------------------------------------------------------


def _svd_text(name: str, r: int, rep: dict) -> str:
    return (f"{name}, r = {r}: {rep['params']:,} parameters ({rep['params %']}% of the full matrix), "
            f"energy kept {rep['energy']:.1%}, relative error {rep['error']:.3f}")


def test_05_svd_explorer_follows_its_controls_in_jupyterlab(lab, lab_browser):
    notebook = "05_lora.ipynb"
    widget_at, below = _widget_position(lab, notebook, lambda s: "svd_explorer(" in s or 'description="matrix"' in s)
    report_cell = next(s for s in _code_cells(lab, notebook) if "def low_rank_report" in s)

    # Expected numbers: the notebook's own low_rank_report on the pretrained W0 (the finetuning update
    # dW needs the notebook's training run, so only its parameter count is checked).
    import pandas as pd
    import torch

    from pefttutor.models import load_minilm

    enc, _ = load_minilm(device="cpu")
    ns = {"enc": enc, "torch": torch, "pd": pd, "print": lambda *a, **k: None}
    exec(compile(report_cell, f"{notebook}:low_rank_report", "exec"), ns)
    w0, low_rank_report = ns["W0"], ns["low_rank_report"]

    with _opened(lab, lab_browser, notebook) as (page, seen):
        _run_up_to_widget(page, lab, widget_at, below)
        cell = _widget_cell(page, "matrix")
        info = cell.locator(".widget-html-content, .jp-RenderedHTML").filter(has_text="relative error")
        picture = Picture(cell.locator(".jp-OutputArea img"), seen)
        matrix = _control(cell, "widget-dropdown", "matrix").locator("select")
        slider = _control(cell, "widget-slider", "r")

        first = matrix.evaluate("s => s.value")
        r0 = int(slider.locator(".noUi-handle").get_attribute("aria-valuetext"))
        params = r0 * sum(w0.shape)  # every matrix the explorer offers is 384 x 384
        _expect(info).to_contain_text(f"{first}, r = {r0}: {params:,} parameters "
                                      f"({round(100 * params / w0.numel(), 2)}% of the full matrix)")

        name = "W0 (pretrained)"
        matrix.select_option(name)
        _expect(info).to_have_text(_svd_text(name, r0, low_rank_report(w0, r0)))
        picture.redrawn(f"choosing {name}")

        _type_into_readout(slider, 32)
        _expect(info).to_have_text(_svd_text(name, 32, low_rank_report(w0, 32)))
        picture.redrawn("typing r = 32")

        _press_on_handle(slider, "ArrowLeft", 1, 31)
        _expect(info).to_have_text(_svd_text(name, 31, low_rank_report(w0, 31)))
        picture.redrawn("pressing ArrowLeft on r")

        _screenshot(cell, "05_lora-svd_explorer")
        _no_script_errors(seen)


# --- notebook 03: the prefix attention viewer ------------------------------------------------------


def _in_kernel(lab, notebook: str, code: str) -> str:
    """Run `code` in the notebook's own kernel through a second client (the lab's runtime folder holds
    its connection file) and return what it printed: numbers computed beside the widget, not by it."""
    from jupyter_client import BlockingKernelClient

    sessions = json.loads(_get(f"{lab['base']}api/sessions?token={TOKEN}"))
    kernel = next(s["kernel"]["id"] for s in sessions if notebook in (s["path"], s["name"]))
    client = BlockingKernelClient(connection_file=str(lab["runtime"] / f"kernel-{kernel}.json"))
    client.load_connection_file()
    client.start_channels()
    printed = []

    def collect(msg):
        if msg["msg_type"] == "stream":
            printed.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            printed.append("\n".join(msg["content"]["traceback"]))

    try:
        reply = client.execute_interactive(code, timeout=STEP_TIMEOUT_MS / 1000, output_hook=collect)
    finally:
        client.stop_channels()
    assert reply["content"]["status"] == "ok", "".join(printed)
    return "".join(printed).strip()


def test_03_prefix_attention_viewer_follows_its_controls_in_jupyterlab(lab, lab_browser):
    notebook = "03_prefix_tuning.ipynb"
    widget_at, below = _widget_position(lab, notebook, lambda s: "prefix_attention_viewer(" in s)

    def expected(example: int, layer: int) -> str:
        """The viewer's sentence for one layer, from attention_maps.prefix_mass on the notebook's trained
        model, computed in its kernel without the widget."""
        return _in_kernel(lab, notebook, f"""
from pefttutor import attention_maps as _maps
_text = list(viewer_texts)[{example}]
_mass, _ = _maps.prefix_mass(llm, ltok(viewer_texts[_text], return_tensors="pt")["input_ids"].to(device))
_layer = _mass[0, {layer}].mean(-1)  # (heads,): each head's mean over the tokens
print(f"layer {layer}: {{_layer.mean():.1%}} (heads {{_layer.min():.1%}} to {{_layer.max():.1%}})")
""")

    with _opened(lab, lab_browser, notebook) as (page, seen):
        _run_up_to_widget(page, lab, widget_at, below)
        cell = _widget_cell(page, "example")
        info = cell.locator(".widget-html-content, .jp-RenderedHTML").filter(has_text="of the attention")
        picture = Picture(cell.locator(".jp-OutputArea img"), seen)
        example = _control(cell, "widget-dropdown", "example").locator("select")
        slider = _control(cell, "widget-slider", "layer")
        labels = example.locator("option").all_text_contents()
        assert len(labels) == 3, labels
        last = int(slider.locator(".noUi-handle").get_attribute("aria-valuetext"))

        def shows(i: int, layer: int) -> None:
            _expect(info).to_contain_text(labels[i])
            _expect(info).to_contain_text(expected(i, layer))

        shows(0, last)  # as the cell made it: the first example, the top layer

        example.select_option(index=2)
        shows(2, last)
        picture.redrawn("choosing the third example")

        _type_into_readout(slider, 12)
        shows(2, 12)
        picture.redrawn("typing layer 12")

        _press_on_handle(slider, "ArrowLeft", 1, 11)
        shows(2, 11)
        picture.redrawn("pressing ArrowLeft on the layer")

        _screenshot(cell, "03_prefix_tuning-prefix_attention_viewer")
        _no_script_errors(seen)
