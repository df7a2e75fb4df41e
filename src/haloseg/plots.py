"""The figures' shared set-up: matplotlib without a display, PNGs written whole or not at all,
and label maps drawn over an image in one colour per class."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["draw_labels", "pyplot", "save_figure"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: most runs draw
    nothing, and a cluster node has no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG at ``path`` and close it.

    The PNG goes to a hidden file beside ``path`` first and is renamed over it, so a reader
    (or a run that is killed) never sees half a picture.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    pyplot().close(fig)


def draw_labels(ax: Any, mask: np.ndarray) -> None:
    """Draw the label map ``mask`` over what ``ax`` shows: one colour per class (tab10,
    modulo 10), background clear."""
    colours = pyplot().get_cmap("tab10")(mask % 10)
    colours[..., 3] = np.where(mask > 0, 0.45, 0.0)
    ax.imshow(colours)
