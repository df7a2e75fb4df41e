"""GPU checks that CI cannot run: bf16 training, tiled inference on CUDA, peak GPU memory.

    python benchmarks/gpu_check.py [--out results.json]

Prints a table per check. Packages haloseg imports but these checks do not use (zarr,
TensorBoard, matplotlib) are replaced by stubs when absent, so the script also runs on a
bare GPU machine with only torch and numpy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types


def _stub_missing() -> None:
    try:
        import zarr  # noqa: F401
    except ImportError:
        sys.modules["zarr"] = types.ModuleType("zarr")
        sys.modules["zarr"].Group = sys.modules["zarr"].Array = object
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        tb = types.ModuleType("torch.utils.tensorboard")

        class SummaryWriter:
            def __init__(self, *a, **k): ...
            def add_scalar(self, *a, **k): ...
            def close(self): ...

        tb.SummaryWriter = SummaryWriter
        sys.modules["torch.utils.tensorboard"] = tb


def train_check(amp: bool, size: int, steps: int) -> dict:
    from haloseg.config import load_config
    from haloseg.training import build_trainer, final_metrics, fit

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [
            f"output_dir={tmp}", "device=cuda", f"data.shape=[{size},{size}]",
            "data.num_images=16", f"train.steps={steps}", "train.batch_size=2",
            f"train.amp={str(amp).lower()}", f"train.val_every={steps}",
            f"train.checkpoint_every={steps}",
        ])  # fmt: skip
        trainer = build_trainer(cfg)
        import torch

        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fit(trainer, progress=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        m = final_metrics(trainer)
        return {
            "check": "train", "amp": amp, "size": size, "steps": steps,
            "first_loss": trainer.history[0]["loss"], "last_loss": trainer.history[-1]["loss"],
            "dice_mean": m.get("dice_mean"), "step_s": m["step_seconds_median"],
            "wall_s": wall, "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
        }  # fmt: skip


def infer_check(shape: tuple[int, ...], tile: tuple[int, ...], tf32: bool = False) -> dict:
    import numpy as np
    import torch

    # TF32 convolutions (cuDNN's default) round to 10 mantissa bits: whole and tiled then
    # differ by ~1e-4 because they run different algorithms, not because tiles are inexact.
    torch.backends.cudnn.allow_tf32 = tf32

    from haloseg.inference import predict_tiled, predict_whole, receptive_field
    from haloseg.models import unet_preset

    torch.manual_seed(0)
    dims = len(shape)
    model = unet_preset("small", spatial_dims=dims, in_channels=1, out_channels=3).cuda().eval()
    image = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    rf = receptive_field(model, dims)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    whole = predict_whole(model, torch.from_numpy(image)[None].cuda(), rf.alignment)
    torch.cuda.synchronize()
    whole_s, whole_mib = time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20
    whole = whole[0].cpu().numpy()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    got = predict_tiled(model, image, tile, output="logits", rf=rf, batch_size=2)
    tiled_s, tiled_mib = time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20
    return {
        "check": "infer", "shape": list(shape), "tile": list(tile), "halo": list(rf.halo),
        "tf32": tf32,
        "max_rel_diff": float(np.abs(got - whole).max() / np.abs(whole).max()),
        "whole_s": whole_s, "whole_peak_gpu_mib": whole_mib,
        "tiled_s": tiled_s, "tiled_peak_gpu_mib": tiled_mib,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args()
    _stub_missing()
    import torch

    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    rows = [
        train_check(amp=False, size=256, steps=60),
        train_check(amp=True, size=256, steps=60),
        train_check(amp=False, size=1024, steps=6),
        train_check(amp=True, size=1024, steps=6),
        infer_check((1000, 777), (256, 256)),
        infer_check((4096, 4096), (1024, 1024), tf32=True),
        infer_check((4096, 4096), (1024, 1024)),
        infer_check((77, 130, 101), (64, 64, 64)),
    ]
    for r in rows:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                       "rows": rows}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
