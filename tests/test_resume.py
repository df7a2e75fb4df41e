"""Checkpoints: atomic, checksummed, and a run killed with SIGKILL under torchrun's elastic
restart ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from haloseg.config import load_config, save_config
from haloseg.errors import DataError
from haloseg.parallel.spawn import free_port
from haloseg.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from haloseg.training.run import train

STEPS = 24


def _config(folder: Path, *extra: str):
    return load_config(
        None,
        [
            f"output_dir={folder}", "device=cpu", "data.shape=[96,96]", "data.num_images=8",
            "model.depth=3", "model.base_channels=8", "train.dtype=float64",
            f"train.steps={STEPS}", "train.val_every=12", "train.checkpoint_every=3",
            "parallel.grid=[1,2]", *extra,
        ],
    )  # fmt: skip


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _torchrun(config: Path, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
        "--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m", "haloseg", "-v", "train", str(config), "--resume", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HALOSEG_GLOO_TIMEOUT": "60"}
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def _checkpoint_step(folder: Path) -> int:
    path = latest_checkpoint(folder / "checkpoints")
    return int(path.stem.split("-")[1]) if path is not None else 0


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / "checkpoints")["model"]


def test_killed_rank_resumes_to_the_uninterrupted_weights(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    config = tmp_path / "run.yaml"
    save_config(_config(killed), config)
    proc = _torchrun(config, tmp_path / "torchrun.log")
    try:
        deadline = time.monotonic() + 240
        while _checkpoint_step(killed) < 6 and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        step_at_kill = _checkpoint_step(killed)
        workers = [c for agent in _children(proc.pid) for c in [agent, *_children(agent)]]
        workers = [w for w in workers if "haloseg" in Path(f"/proc/{w}/cmdline").read_text()]
        assert proc.poll() is None and workers, "the run ended before it could be killed"
        os.kill(workers[-1], signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "torchrun.log").read_text()
    assert step_at_kill < STEPS and "resuming at step" in log, log[-3000:]

    from haloseg.parallel.spawn import run_distributed

    run_distributed(_train_quietly, 2, _config(whole), timeout=300)
    got, want = _weights(killed), _weights(whole)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def _train_quietly(cfg) -> None:
    train(cfg, progress=False, previews=0)


def test_interrupted_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, {"w": torch.arange(3.0), "step": 1}, 1)

    def crash(fd: int) -> None:
        raise KeyboardInterrupt  # the process dies between writing and renaming

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, {"w": torch.arange(5.0), "step": 2}, 2)
    monkeypatch.undo()
    state = load_checkpoint(folder)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(3.0))
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-0000001.pt"]


def test_corrupt_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "checkpoints"
    path = save_checkpoint(folder, {"w": torch.ones(4)}, 7)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="SHA-256"):
        load_checkpoint(folder)


def test_only_the_last_two_checkpoints_are_kept(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in range(1, 5):
        save_checkpoint(folder, {"step": step}, step)
    assert sorted(p.name for p in folder.glob("*.pt")) == ["step-0000003.pt", "step-0000004.pt"]
    assert load_checkpoint(folder)["step"] == 4
