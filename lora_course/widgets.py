"""Notebook widgets that react with or without a kernel.

An ipywidgets slider normally asks the Python kernel to redraw, so on a rendered
book page (saved widget state, no kernel) moving it does nothing.
``interact_frames(fn, grid)`` fixes that: at execution time it calls ``fn`` on
every point of a small grid (at most 12), renders each result once (a matplotlib
figure becomes a PNG, text becomes a ``<pre>`` block), stacks the frames in an
``ipywidgets.Stack`` and links each control to the stack *in the browser* with
``jslink``. The saved notebook then holds every frame, and the page switches
between them with no kernel at all.

With a live kernel (JupyterLab) the same widget also recomputes: the first move
of a control reveals free sliders for the numeric parameters, and any value
they take, on the grid or between its points, is drawn by calling ``fn`` again.

Used by notebooks 02-14; the idea is point 9 of the course's style guide.
"""

from __future__ import annotations

import html
import io
import math
from contextlib import contextmanager, redirect_stdout

import ipywidgets as widgets

MAX_FRAMES = 12  # every frame is saved in the notebook and the book page


@contextmanager
def _figures_kept():
    """Let ``fn`` end in ``plt.show()`` as a reader's cell does, without displaying it.

    The inline backend's ``show`` would print each frame into the cell output and close
    it before we can save it as a PNG.
    """
    import matplotlib.pyplot as plt

    show = plt.show
    plt.show = lambda *args, **kwargs: None
    try:
        yield plt
    finally:
        plt.show = show


def render(fn, kwargs: dict, dpi: int = 80) -> tuple[str, object]:
    """Call ``fn(**kwargs)`` once; return ("png", bytes) for a figure or ("html", str) for text.

    A figure is whatever ``fn`` returns as a matplotlib Figure, else the one figure it
    opened; text is what it returns as a ``str``, else what it printed.
    """
    with _figures_kept() as plt:
        before = set(plt.get_fignums())
        printed = io.StringIO()
        with redirect_stdout(printed):
            result = fn(**kwargs)
        new = [plt.figure(n) for n in plt.get_fignums() if n not in before]
        figure = result if hasattr(result, "savefig") else (new[-1] if new else None)
        if figure is not None:
            png = io.BytesIO()
            figure.savefig(png, format="png", dpi=dpi, bbox_inches="tight")
            for fig in {*new, figure}:
                plt.close(fig)
            return "png", png.getvalue()
    text = result if isinstance(result, str) else printed.getvalue()
    return "html", f"<pre style='margin:0'>{html.escape(text.rstrip())}</pre>"


def _frame_widget(kind: str, value) -> widgets.Widget:
    if kind == "png":
        return widgets.Image(value=value, format="png", layout=widgets.Layout(max_width="100%"))
    return widgets.HTML(value=value)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _label(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def grid_control(name: str, values: list, start, description: str) -> widgets.Widget:
    """A control with an ``index`` trait (the thing jslink drives the stack with)."""
    options = [(_label(v), v) for v in values]
    if all(_is_number(v) for v in values):
        return widgets.SelectionSlider(
            options=options, value=start, description=description, continuous_update=True,
            style={"description_width": "initial"},
        )  # fmt: skip
    if len(values) <= 4:
        return widgets.ToggleButtons(options=options, value=start, description=description)
    return widgets.Dropdown(options=options, value=start, description=description)


def free_control(values: list, start, description: str) -> widgets.Widget | None:
    """A slider over the grid's whole range, for values between the frames (kernel only)."""
    if not all(_is_number(v) for v in values) or len(values) < 2:
        return None
    lo, hi = min(values), max(values)
    style = {"description_width": "initial"}
    if all(isinstance(v, int) for v in values):
        return widgets.IntSlider(value=start, min=lo, max=hi, description=description, style=style)
    if lo > 0 and hi / lo >= 20:  # a range over decades reads better on a log scale
        a, b = math.log10(lo), math.log10(hi)
        return widgets.FloatLogSlider(
            value=start, base=10, min=a, max=b, step=(b - a) / 100, description=description, style=style
        )
    return widgets.FloatSlider(
        value=start, min=lo, max=hi, step=(hi - lo) / 100, description=description, style=style
    )


def interact_frames(fn, grid: dict, start: dict | None = None, labels: dict | None = None, dpi: int = 80):
    """Show ``fn`` over a grid of keyword values as a widget that works with or without a kernel.

    ``grid`` maps each keyword of ``fn`` to its values, e.g. ``{"rank": [1, 4, 16, 64]}``;
    the product of the grid sizes must be at most 12. ``start`` picks the values shown
    first (default: the first of each), ``labels`` the controls' descriptions.
    Returns the widget (a VBox); display it or leave it as a cell's last expression.
    """
    names = list(grid)
    values = [list(grid[n]) for n in names]
    n_frames = math.prod(len(v) for v in values)
    if not names or n_frames > MAX_FRAMES:
        raise ValueError(
            f"interact_frames: the grid {dict(zip(names, values))} has {n_frames} points; "
            f"give it between 1 and {MAX_FRAMES} (every frame is saved in the page)"
        )
    start = {n: v[0] for n, v in zip(names, values)} | dict(start or {})
    for n, v in zip(names, values):
        if start[n] not in v:
            raise ValueError(f"interact_frames: start value {n}={start[n]!r} is not in the grid {v}")
    labels = dict(labels or {})

    # One level of nested Stacks per parameter: the control of parameter k is linked to
    # every stack at depth k, so any combination is reached without computing an index
    # in the browser.
    stacks: list[list[widgets.Stack]] = [[] for _ in names]
    kinds = set()

    def build(level: int, chosen: dict) -> widgets.Widget:
        if level == len(names):
            kind, value = render(fn, chosen, dpi)
            kinds.add(kind)
            return _frame_widget(kind, value)
        name = names[level]
        children = [build(level + 1, {**chosen, name: v}) for v in values[level]]
        stack = widgets.Stack(children, selected_index=values[level].index(start[name]))
        stacks[level].append(stack)
        return stack

    frames = build(0, {})
    if len(kinds) != 1:
        raise ValueError("interact_frames: fn drew a figure for some values and text for others")
    controls = [grid_control(n, v, start[n], labels.get(n, n)) for n, v in zip(names, values)]
    for control, level in zip(controls, stacks):
        for stack in level:
            widgets.jslink((control, "index"), (stack, "selected_index"))

    # The live part: hidden in the saved state, so a book page shows only the frames.
    # Only a running kernel executes the observers below, which reveal it.
    free = {n: free_control(v, start[n], labels.get(n, n) + " (any)") for n, v in zip(names, values)}
    free = {n: w for n, w in free.items() if w is not None}
    live_frame = _frame_widget(kinds.pop(), b"" if isinstance(_first_frame(frames), widgets.Image) else "")
    live_frame.layout.display = "none"
    note = widgets.HTML("<small>Kernel running: these sliders take any value and redraw.</small>")
    live_box = widgets.VBox([note, *free.values()], layout=widgets.Layout(display="none"))
    syncing = []  # non-empty while the grid controls set the free sliders

    def on_grid(change):
        live_box.layout.display = None
        live_frame.layout.display = "none"
        frames.layout.display = None
        syncing.append(True)
        try:
            for n, control in zip(names, controls):
                if n in free:
                    free[n].value = control.value
        finally:
            syncing.pop()

    def on_free(change):
        if syncing:
            return
        kwargs = {n: (free[n].value if n in free else c.value) for n, c in zip(names, controls)}
        _, value = render(fn, kwargs, dpi)
        live_frame.value = value
        frames.layout.display = "none"
        live_frame.layout.display = None

    for control in controls:
        control.observe(on_grid, names="value")
    for slider in free.values():
        slider.observe(on_free, names="value")
    box = widgets.VBox([*controls, live_box, frames, live_frame])
    box.add_class("lc-frames")  # the browser tests find the widget by this class
    return box


def _first_frame(widget: widgets.Widget) -> widgets.Widget:
    while isinstance(widget, widgets.Stack):
        widget = widget.children[0]
    return widget
