"""Data that looks real and runs of the shipped configs, for the tests of the user's path."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from haloseg.cli.main import main
from haloseg.data import EllipseDataset, export_dataset
from haloseg.inference import predict_whole
from haloseg.inference.run import load_model
from haloseg.parallel.spawn import free_port

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def scanner_data(folder: Path, fmt: str, shape: list[int], channels: int, *, images: int,
                 classes: int = 3, seed: int = 0) -> Path:  # fmt: skip
    """Ellipses written like scanner/satellite files (raw intensities, real geometry)."""
    dataset = EllipseDataset(shape, num_images=images, num_classes=classes,
                             in_channels=channels, noise=0.3, seed=seed)  # fmt: skip
    return export_dataset(dataset, folder, fmt, scanner=True)


def cli(*argv: str) -> tuple[int, str, str]:
    """``haloseg ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = int(e.code)
    return code, out.getvalue(), err.getvalue()


def train(config: str, run: Path, *overrides: str) -> Path:
    """``haloseg train configs/CONFIG`` with ``overrides``, in one process on the CPU."""
    argv = ["train", str(CONFIGS / config), f"output_dir={run}", "device=cpu",
            "parallel.grid=null", "parallel.data=1", "train.amp=false", *overrides,
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return run


def zscore(image: np.ndarray, scheme: str) -> torch.Tensor:
    """Training's normalisation of a whole ``(C, *spatial)`` image, at once in float64."""
    x = torch.from_numpy(np.asarray(image, np.float64))
    out = torch.zeros_like(x)
    for c in range(x.shape[0]):
        mask = x[c] != 0 if scheme == "zscore_nonzero" else torch.ones_like(x[c], dtype=bool)
        values = x[c][mask]
        out[c][mask] = (values - values.mean()) / values.std(unbiased=False)
    return out.float()


def whole_logits(run: Path, image: np.ndarray) -> np.ndarray:
    """One forward pass of the run's model over the whole normalised ``image``."""
    model, spec = load_model(run)
    x = zscore(image, spec.normalize)[None]
    return predict_whole(model, x, 2**model.depth)[0].numpy()


def torchrun_infer(nproc: int, *args: str, log: Path) -> None:
    """``torchrun --nproc-per-node NPROC -m haloseg infer ARGS`` on loopback."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
           f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "haloseg", "infer", *args,
           "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HALOSEG_GLOO_TIMEOUT": "60"}
    with log.open("w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300)
    assert code.returncode == 0, log.read_text()[-3000:]
