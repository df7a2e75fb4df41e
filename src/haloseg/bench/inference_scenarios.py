"""The inference benchmark's scenarios: one test image each, the network fitted for it, and
the configurations of haloseg and MONAI compared on it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from haloseg.models import unet_preset

__all__ = ["CLASSES", "SCENARIOS", "Scenario", "scenario_model"]

CLASSES = 3


@dataclass(frozen=True)
class Scenario:
    """One test image, the network fitted for it, and the configurations to compare."""

    shape: tuple[int, ...]
    """Spatial shape of the test image (sample 0 of ``EllipseDataset(shape)``)."""
    train_shape: tuple[int, ...]
    """Spatial shape of the training images."""
    train_steps: int
    """AdamW steps on the training images (batch 2 in 2-D, 1 in 3-D)."""
    haloseg: tuple[tuple[str, int], ...]
    """``predict_tiled`` runs: (output, side of the tile core)."""
    monai: tuple[tuple[int, float], ...]
    """``sliding_window_inference`` runs: (side of the window, overlap); gaussian blending."""
    monai_channels_last: tuple[tuple[int, float], ...] = ()
    """The same, with the model converted to channels-last memory format first (the layout
    ``predict_tiled`` runs on CPU), so the comparison does not rest on the layout alone."""


SCENARIOS: dict[str, Scenario] = {
    "2d-8192": Scenario(
        shape=(8192, 8192),
        train_shape=(256, 256),
        train_steps=30,
        haloseg=(("labels", 1024), ("labels", 2048), ("probabilities", 2048), ("logits", 2048)),
        monai=((512, 0.25), (1024, 0.25), (2048, 0.25), (512, 0.5), (1024, 0.5)),
        monai_channels_last=((512, 0.25),),
    ),
    # The 2-D targets alone: haloseg's fastest tile against MONAI's cheapest setting.
    "2d-8192-target": Scenario(
        shape=(8192, 8192),
        train_shape=(256, 256),
        train_steps=30,
        haloseg=(("labels", 1024),),
        monai=((512, 0.25), (1024, 0.25)),
        monai_channels_last=((512, 0.25),),
    ),
    # The halo is 112 per side: at 256³ a tile core of 64 puts 27 times the image through the
    # network, 128 puts 5.4 times; no core below the whole image does better.
    "3d-256": Scenario(
        shape=(256, 256, 256),
        train_shape=(64, 64, 64),
        train_steps=20,
        haloseg=(("labels", 128), ("probabilities", 128)),
        monai=((96, 0.25), (128, 0.25), (96, 0.5), (128, 0.5)),
    ),
    # A smoke run of every code path in about a minute.
    "2d-1024": Scenario(
        shape=(1024, 1024),
        train_shape=(128, 128),
        train_steps=5,
        haloseg=(("labels", 256), ("probabilities", 256), ("logits", 256)),
        monai=((256, 0.25), (256, 0.5)),
    ),
}


def scenario_model(spatial_dims: int) -> torch.nn.Module:
    """The benchmark's U-Net, freshly seeded (its weights come from ``prepare``)."""
    torch.manual_seed(0)
    return unet_preset("small", spatial_dims=spatial_dims, in_channels=1, out_channels=CLASSES)
