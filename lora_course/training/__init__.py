"""Training: the settings, the loss, one compiled step, the loop, resume state and plots.

``args`` -> ``schedules`` / ``step`` / ``losses`` / ``evaluate`` -> ``resume`` -> ``trainer``.
Taught in notebooks 10 (the training loop) and 11 (scaling out).
"""

from lora_course.training.args import TrainingArgs
from lora_course.training.evaluate import evaluate, loss
from lora_course.training.losses import js_div_loss, kl_div_loss
from lora_course.training.plots import LivePlot, plot_history
from lora_course.training.run import TrainingDivergedError, TrainingHistory
from lora_course.training.trainer import train

__all__ = [
    "TrainingArgs",
    "evaluate",
    "loss",
    "js_div_loss",
    "kl_div_loss",
    "TrainingDivergedError",
    "TrainingHistory",
    "train",
    "LivePlot",
    "plot_history",
]
