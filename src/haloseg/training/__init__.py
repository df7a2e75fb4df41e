"""Full-image training: blocks of each sample per rank, global losses and metrics,
checkpoints that resume exactly."""

from haloseg.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from haloseg.training.loop import Trainer, build_trainer, final_metrics, fit
from haloseg.training.run import train

__all__ = [
    "Trainer",
    "build_trainer",
    "final_metrics",
    "fit",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
