"""Mixed precision for the custom autograd Functions: CUDA autocast in forward and backward.

``amp_forward`` and ``amp_backward`` decorate an ``autograd.Function``'s forward and backward
so that backward runs with the dtypes and autocast state of forward; ``autocast_inputs``
casts a convolution's operands the way autocast would have.
"""

from __future__ import annotations

import torch

__all__ = ["amp_backward", "amp_forward", "autocast_inputs"]

# Under CUDA autocast, backward runs with the dtypes and autocast state of forward.
amp_forward = torch.amp.custom_fwd(device_type="cuda")
amp_backward = torch.amp.custom_bwd(device_type="cuda")


def autocast_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A convolution's operands in the autocast dtype, when CUDA autocast is on.

    Autocast does not reach ``aten.convolution_backward``, which the custom backwards call:
    they must find the operands saved in the dtype the forward computed in.
    """
    if not x.is_cuda or not torch.is_autocast_enabled("cuda"):
        return x, weight, bias
    dtype = torch.get_autocast_dtype("cuda")
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
