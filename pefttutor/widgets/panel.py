"""`Panel`: an interactive view whose picture is also an ordinary output, so a saved notebook shows it.

A panel is named controls (ipywidgets), `compute(**values) -> state` (what the numbers are) and
`draw(state) -> (html, figure)` (how they look). Displayed (end a cell with it), it shows the
controls and, below them, the drawing as plain outputs, an HTML line and a PNG of the figure,
under display ids that each change of a control updates. With a kernel the picture follows the
controls; without one (GitHub, nbviewer, an untrusted notebook, the static site) a reader still
sees the picture of the state the notebook was saved in, where a widget alone would show nothing.

Tests drive a panel as a reader would: set `panel.controls[name].value` (or `panel.set(...)`) and
read `panel.state`, `panel.html` and `panel.figure`.
"""

from __future__ import annotations

import html as html_
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ipywidgets
from IPython.display import HTML, Image, display

from .. import plots


def set_options(control: ipywidgets.Widget, options: Sequence, fallback: Sequence) -> None:
    """Give a Dropdown or SelectMultiple new options, keeping what is still valid of its value
    (else `fallback`, the values to select)."""
    options = list(options)
    if list(control.options) == options:
        return
    multiple = isinstance(control, ipywidgets.SelectMultiple)
    chosen = control.value if multiple else (control.value,)
    keep = [v for v in chosen if v in options] or [v for v in fallback if v in options] or options[:1]
    # one message to the browser: options and value apart, the page would first select positions
    # of the old options that the new ones lack ("Cannot set properties of undefined")
    with control.hold_sync():
        control.options = options
        control.value = tuple(keep) if multiple else keep[0]


class Panel:
    """Controls, the state they compute and its drawing; see the module docstring.

    uses(values) -> names of the controls the current values need (the others are hidden and not
    passed to `compute`); link(controls) adapts controls to each other (options, ranges) before
    each computation. A ValueError from `compute` is shown in place of the drawing.
    """

    def __init__(self, controls: dict[str, ipywidgets.ValueWidget], compute: Callable[..., Any],
                 draw: Callable[[Any], tuple[str, Any]], uses: Callable[[dict], Iterable[str]] | None = None,
                 link: Callable[[dict], None] | None = None):
        self.controls, self._compute, self._draw = controls, compute, draw
        self._uses = uses or (lambda values: values)
        self._link = link or (lambda controls: None)
        self._handles: list[list] = []  # per display of the panel: the handles of its outputs
        self._busy = False  # inside update or set: the controls it moves must not recompute
        self.widget = ipywidgets.VBox(list(controls.values()))
        for control in controls.values():
            control.observe(self.update, "value")
        self.update()

    def values(self) -> dict[str, Any]:
        return {name: control.value for name, control in self.controls.items()}

    def set(self, **values) -> None:
        """Move several controls in the order given, each adapting the others as a reader's move
        would (`link`: a task's methods, a model's matrices), then recompute once."""
        self._busy = True
        try:
            for name, value in values.items():
                self.controls[name].value = value
                self._link(self.controls)
        finally:
            self._busy = False
        self.update()

    def update(self, change=None) -> None:
        """Recompute and redraw for the controls' values (each control's change calls it)."""
        if self._busy:
            return
        self._busy = True
        try:
            self._link(self.controls)
            values = self.values()
            used = set(self._uses(values))
            for name, control in self.controls.items():
                control.layout.display = None if name in used else "none"
            try:
                self.state = self._compute(**{k: v for k, v in values.items() if k in used})
            except ValueError as e:  # a setting the computation refuses, e.g. no target matrices
                self.state, self.figure, self.png = None, None, None
                self.html = f"<b>Not possible:</b> {html_.escape(str(e))}"
            else:
                self.html, self.figure = self._draw(self.state)
                self.png = plots.png(self.figure)
        finally:
            self._busy = False
        for handles in self._handles:
            for handle, output in zip(handles, self._outputs()):
                handle.update(output)

    def _outputs(self) -> list:
        return [HTML(self.html), Image(self.png, format="png") if self.png else HTML("")]

    def _ipython_display_(self) -> None:
        display(self.widget)
        self._handles.append([display(output, display_id=True) for output in self._outputs()])
