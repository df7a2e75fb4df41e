"""Channels-last end to end: partitioned U-Nets whose weights and blocks are channels-last
equal one contiguous process and keep the layout; ``haloseg train`` in either memory format
reaches the same weights."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from _equivalence import Case, run_cases, tolerance
from haloseg.cli.main import main
from haloseg.models import UNet
from haloseg.parallel.spawn import run_distributed
from haloseg.training.checkpoint import load_checkpoint

NORMS = ("batch", "instance", "group")
UPSAMPLINGS = ("transposed", "linear")


def _unet(norm: str, upsampling: str) -> UNet:
    return UNet(spatial_dims=2, in_channels=2, out_channels=3, depth=2, base_channels=4,
                norm=norm, norm_groups=2, upsampling=upsampling)  # fmt: skip


def _case(norm: str, up: str, batch: int, fmt: torch.memory_format, seed: int) -> Case:
    name = f"unet2d-{norm}-{up}-batch{batch}-{'cl' if fmt == torch.channels_last else 'contig'}"
    return Case(name, functools.partial(_unet, norm, up), (28, 44), (2, 2), batch=batch,
                seed=seed, memory_format=fmt)  # fmt: skip


def test_channels_last_unet_2x2_equals_one_process() -> None:
    cl, contiguous = torch.channels_last, torch.contiguous_format
    # One sample normalises the block itself (per channel, or per run of channels for
    # GroupNorm); several view it as rows of samples, which copies a channels-last block.
    settings = [(n, u, 1, cl) for n in NORMS for u in UPSAMPLINGS]
    settings += [(n, "linear", 2, cl) for n in NORMS]
    settings += [(n, "transposed", 1, contiguous) for n in ("instance", "group")]
    cases = [_case(*setting, seed=i) for i, setting in enumerate(settings)]
    tol = tolerance(torch.float64)
    for rank_results in run_distributed(run_cases, 4, cases, timeout=600):
        failures = [f"{name}: {errs}" for name, errs in rank_results
                    if not all(v <= tol for v in errs.values())]  # fmt: skip
        assert not failures, "\n".join(failures)
        # The layout checks ran: outputs and input gradients came back channels-last.
        assert sum("memory_format" in errs for _, errs in rank_results) == len(settings) - 2


TINY = [
    "data.shape=[32, 32]", "data.num_images=4", "train.steps=2", "train.val_every=2",
    "model.depth=2", "model.base_channels=4", "device=cpu", "train.dtype=float64",
]  # fmt: skip


def _train(folder: Path, *overrides: str) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tiny.yaml"
    config.write_text("name: tiny\n")
    return main(["train", str(config), f"output_dir={folder / 'run'}", *TINY, *overrides,
                 "--no-progress"])  # fmt: skip


def test_train_memory_formats_reach_the_same_weights(tmp_path: Path) -> None:
    weights = {}
    for fmt in ("contiguous", "channels_last"):
        assert _train(tmp_path / fmt, f"train.memory_format={fmt}") == 0
        weights[fmt] = load_checkpoint(tmp_path / fmt / "run" / "checkpoints")["model"]
    # The option took effect: the convolution weights were trained channels-last.
    convs = [w for w in weights["channels_last"].values()
             if w.dim() == 4 and w.shape[1] > 1 and w[0, 0].numel() > 1]  # fmt: skip
    assert convs and all(not w.is_contiguous() for w in convs)
    for name, want in weights["contiguous"].items():
        got = weights["channels_last"][name]
        if got.is_floating_point():
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
        else:
            assert torch.equal(got, want), name


def test_train_bad_memory_format_is_one_line(tmp_path: Path, capsys) -> None:
    assert _train(tmp_path, "train.memory_format=nhwc") == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("haloseg: error: "), lines
    assert "train.memory_format='nhwc'" in lines[0] and "channels_last" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("device", "amp", "dims", "want"),
    [
        ("cpu", False, 2, torch.channels_last),
        ("cpu", False, 3, torch.channels_last_3d),
        ("cuda", False, 2, torch.contiguous_format),
        ("cuda", True, 3, torch.channels_last_3d),
    ],
)
def test_auto_memory_format(device: str, amp: bool, dims: int, want: torch.memory_format) -> None:
    from haloseg.training.setup import memory_format

    assert memory_format("auto", torch.device(device), amp, dims) == want
    assert memory_format("contiguous", torch.device(device), amp, dims) == torch.contiguous_format
