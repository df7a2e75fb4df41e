"""The base of the partitioned layers: a mixin that gives a PyTorch layer an exact forward on
local blocks.

``spatial_parallel`` swaps a layer's class for ``(Mixin, OriginalClass)``, so parameters,
buffers, ``state_dict`` keys and ``isinstance`` checks stay those of the original layer. A
mixin reads the layer's geometry from the registry (``haloseg.geometry.registry``) and runs
the partitioned execution of that geometry on its ``Site``.
"""

from __future__ import annotations

import torch

from haloseg.errors import DecompositionError
from haloseg.geometry import Geometry, Unsupported, layer_geometry
from haloseg.parallel.site import Site

__all__ = ["Partitioned"]


class Partitioned:
    """Base of the partitioned-layer mixins."""

    _hs_mixin = True
    _hs: Site

    def _geometry(self, x: torch.Tensor) -> Geometry:
        try:
            return layer_geometry(self, x.dim() - 2)  # type: ignore[arg-type]
        except Unsupported as e:
            raise DecompositionError(f"layer '{self._hs.path}': {e}") from None
