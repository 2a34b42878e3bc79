"""Watching a run: a live loss plot for notebooks, and the same plot from a finished run.

``train`` calls ``on_report(info)`` every ``steps_per_report`` steps and ``on_eval(info)``
after every validation (only on rank 0). Any object with either method is a callback;
there is no base class to inherit. ``LivePlot`` redraws its figure in place in
Jupyter (one output, updated) and does nothing visible elsewhere; ``plot_history``
draws a finished ``TrainingHistory``, the static twin of the live plot.
Used in notebooks 10 and 11. The small helpers below also draw the loss curves that
``lora-course pretrain`` and ``lora-course quickstart`` save as PNGs.
"""

from __future__ import annotations

import io

from lora_course import atomic

import numpy as np


def new_figure(figsize=(6.4, 3.6)):
    """A matplotlib Figure and its axes, made without pyplot (no GUI backend): for scripts."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def plot_train_loss(ax, losses, points: int = 40, alpha: float = 0.25) -> None:
    """Every step's train loss, faint, and its moving average over about len/points steps."""
    losses = np.asarray(losses, dtype=float)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=alpha, lw=0.8)
    k = max(1, len(losses) // points)
    if len(losses):
        ax.plot(
            steps[k - 1 :],
            np.convolve(losses, np.ones(k) / k, mode="valid"),
            color="tab:blue",
            label="train loss (moving average)",
        )


def finish_axes(ax, title: str, ylabel: str = "loss (nats / token)") -> None:
    """Axis labels, title, grid, and a legend when anything is labelled."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend()


def save_png(fig, path) -> None:
    """The figure as a PNG file, written atomically (see ``atomic.py``)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, dpi=100, format="png")
    atomic.write_bytes(path, buf.getvalue())


def _axes_with_losses(ax, train_steps, train_losses, val_steps, val_losses, title):
    if train_steps:
        ax.plot(train_steps, train_losses, label="train", color="tab:blue")
    if val_steps:
        ax.plot(val_steps, val_losses, "o-", label="validation", color="tab:orange")
    finish_axes(ax, title, ylabel="loss")


def plot_history(history, title: str = "training", ax=None):
    """Per-step train loss and validation loss of a ``TrainingHistory``; returns the figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = list(range(history.start_step + 1, history.start_step + 1 + len(history.losses)))
    evals = history.evals
    _axes_with_losses(
        ax, steps, history.losses, [e["step"] for e in evals], [e["val_loss"] for e in evals], title
    )
    return ax.figure


class LivePlot:
    """A callback that plots train and validation loss as training runs (in Jupyter)."""

    def __init__(self, title: str = "training", figsize=(6.4, 3.6)):
        self.title, self.figsize = title, figsize
        self.train_steps, self.train_losses = [], []
        self.val_steps, self.val_losses = [], []
        self._handle = None

    def on_report(self, info: dict) -> None:
        self.train_steps.append(info["step"])
        self.train_losses.append(info["train_loss"])
        self._refresh()

    def on_eval(self, info: dict) -> None:
        self.val_steps.append(info["step"])
        self.val_losses.append(info["val_loss"])
        self._refresh()

    def figure(self):
        """The current plot as a matplotlib figure."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=self.figsize)
        _axes_with_losses(
            ax, self.train_steps, self.train_losses, self.val_steps, self.val_losses, self.title
        )
        return fig

    def _refresh(self) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None:  # a plain script: nothing to draw into
            return
        import matplotlib.pyplot as plt

        fig = self.figure()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)
        plt.close(fig)  # shown through the handle; do not draw it again at the end of the cell
