"""A network that runs layer-wise under autograd: ``LayerwiseModule(model, block=...)``.

Calling it runs ``LayerwiseExecutor.forward`` (every layer's output kept in the store);
``loss.backward()`` then runs the block-wise backward and hands autograd the image's and the
parameters' gradients, so a training loop, its optimizer and its loss stay as they are.
Under ``torch.no_grad()`` (validation, inference) it is ``LayerwiseExecutor.run``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from haloseg.errors import DataError
from haloseg.layerwise.executor import LayerwiseExecutor
from haloseg.layerwise.store import Store

__all__ = ["LayerwiseModule"]


class _Layerwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, executor: LayerwiseExecutor, spec: list, image: torch.Tensor,
                *weights: torch.Tensor) -> Any:  # fmt: skip
        with _no_autocast(image):
            out = executor.forward(image, input_grad=ctx.needs_input_grad[2])
        leaves, tree = torch.utils._pytree.tree_flatten(out)
        if not all(isinstance(t, torch.Tensor) for t in leaves):
            executor.release()
            raise DataError(
                "layer-wise training needs a network whose outputs are all tensors "
                f"(got {[type(t).__name__ for t in leaves]})"
            )
        spec.append(tree)
        ctx.executor, ctx.weights, ctx.device = executor, weights, image.device
        return tuple(t.to(image.device) for t in leaves)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        executor: LayerwiseExecutor = ctx.executor
        with _no_autocast(grads[0]):
            grad_image, params = executor.gradients(list(grads))
        by_id = {id(w): g for w, g in params.values()}
        out = [by_id.get(id(w)) for w in ctx.weights]
        if grad_image is not None:
            grad_image = grad_image.to(ctx.device)
        return (None, None, grad_image, *out)


class LayerwiseModule(nn.Module):
    """``model`` computed layer by layer over blocks, with autograd: ``loss.backward()`` on
    its output gives the parameters (and a ``requires_grad`` image) the gradients plain
    autograd gives them, while the device holds one block of one layer at a time.

    ``block``, ``device`` and ``store`` as for ``LayerwiseExecutor``. The model is a child
    of this module, so ``state_dict``, ``train()``/``eval()`` and ``parameters()`` are its.
    """

    def __init__(self, model: nn.Module, *, block: int | Sequence[int],
                 device: torch.device | str | None = None,
                 store: str | Path | Store = "memory") -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.executor = LayerwiseExecutor(model, block=block, device=device, store=store)

    def forward(self, image: torch.Tensor) -> Any:
        weights = [p for p in self.model.parameters() if p.requires_grad]
        if not torch.is_grad_enabled() or not (image.requires_grad or weights):
            with _no_autocast(image):
                return _to(self.executor.run(image), image.device)
        spec: list = []
        leaves = _Layerwise.apply(self.executor, spec, image, *weights)
        return torch.utils._pytree.tree_unflatten(list(leaves), spec[0])

    @property
    def report(self) -> Any:
        """The last run's ``LayerwiseReport``."""
        return self.executor.report


def _no_autocast(t: torch.Tensor) -> Any:
    """Blocks run in the model's dtype: the stores were planned for it (``train.amp`` off)."""
    return torch.autocast(t.device.type, enabled=False)


def _to(tree: Any, device: torch.device) -> Any:
    return torch.utils._pytree.tree_map(
        lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree
    )
