"""What a checkpoint of a run holds, and a trainer restored from one.

A checkpoint is refused before any weights load when it belongs to another model: other
input channels, or model settings or classes changed in the config since it was written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from haloseg.config import RunConfig
from haloseg.errors import ConfigError
from haloseg.training.checkpoint import load_checkpoint
from haloseg.training.setup import agree

if TYPE_CHECKING:
    from haloseg.training.trainer import Trainer

__all__ = ["restore_trainer", "trainer_state"]


def trainer_state(trainer: Trainer) -> dict[str, Any]:
    """Everything a resumed run needs, and the spec inference needs (``state["spec"]``)."""
    return {
        "model": trainer.weights.state_dict(),
        "model_args": {
            "spatial_dims": trainer.train_set.spatial_dims,
            "in_channels": trainer.train_set.in_channels,
            "out_channels": trainer.train_set.num_classes,
        },
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "step": trainer.step,
        "torch_rng": torch.get_rng_state(),
        "history": trainer.history,
        "config": trainer.cfg.to_dict(),
        "spec": trainer.spec.to_dict() if trainer.spec is not None else None,
    }


def restore_trainer(trainer: Trainer) -> bool:
    """Load the latest checkpoint of ``trainer``'s run folder into it; False if none."""
    state = agree(lambda: load_checkpoint(trainer.folder / "checkpoints"))
    if state is None:
        return False
    _check_channels(state["model"], trainer.train_set.in_channels)
    _check_same_model(state["config"], trainer.cfg)
    try:
        trainer.weights.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ConfigError(
            f"the checkpoint in {trainer.folder} does not fit this model "
            f"({str(e).splitlines()[-1].strip()}); resume with the run's own config.yaml"
        ) from None
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    trainer.step, trainer.history = int(state["step"]), list(state["history"])
    return True


def _check_same_model(saved: dict[str, Any], cfg: RunConfig) -> None:
    changed = [f"model.{k}" for k, v in saved.get("model", {}).items()
               if getattr(cfg.model, k, v) != v]  # fmt: skip
    if saved.get("data", {}).get("num_classes") != cfg.data.num_classes:
        changed.append("data.num_classes")
    if changed:
        raise ConfigError(
            f"resuming with {', '.join(changed)} changed from the checkpoint's run; resume with "
            "the run's own config.yaml or start a new output_dir"
        )


def _check_channels(weights: dict[str, torch.Tensor], in_channels: int) -> None:
    first = next(v for k, v in weights.items() if k.endswith("weight") and v.dim() > 2)
    if first.shape[1] != in_channels:
        raise ConfigError(
            f"the checkpoint's model takes {first.shape[1]} input channels but the images "
            f"have {in_channels}; use a checkpoint trained on this data or another output_dir"
        )
