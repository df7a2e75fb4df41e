"""Peak memory of ``haloseg infer`` against its ``--max-memory`` budget, at two image sizes.

    python benchmarks/infer_memory.py --sizes 10000 20000 --max-memory 1GB [--json out.json]

Trains a small 2-D U-Net (depth 4, 4 base channels, to keep the run short) for a few
steps, writes random single-channel zarr images of each size (chunks of 1024², never whole
in memory), runs ``haloseg infer`` on each in a fresh process writing uint8 labels to zarr,
and reports the process's peak resident set (``ru_maxrss`` of the child) against the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

CHUNK = 1024


def _image(path: Path, size: int) -> None:
    array = zarr.create_array(path, shape=(1, size, size), dtype="float32",
                              chunks=(1, CHUNK, CHUNK))  # fmt: skip
    rng = np.random.default_rng(size)
    for i in range(0, size, CHUNK):
        for j in range(0, size, CHUNK):
            h, w = min(CHUNK, size - i), min(CHUNK, size - j)
            array[0, i : i + h, j : j + w] = rng.standard_normal((h, w), dtype=np.float32)


def _run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "2"})
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000])
    parser.add_argument("--max-memory", default="1GB")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()
    haloseg = [sys.executable, "-m", "haloseg"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="haloseg-infer-mem-") as tmp:
        folder = Path(tmp)
        (folder / "c.yaml").write_text("name: mem\n")
        train = [*haloseg, "train", str(folder / "c.yaml"), f"output_dir={folder}/run",
                 "data.shape=[128,128]", "train.steps=5", "model.base_channels=4",
                 "device=cpu", "--no-progress"]  # fmt: skip
        subprocess.run(train, check=True, stdout=subprocess.DEVNULL)
        for size in args.sizes:
            source = folder / f"in-{size}.zarr"
            _image(source, size)
            wall, peak = _run([*haloseg, "infer", "--checkpoint", str(folder / "run"),
                               "--input", str(source), "--output", str(folder / f"out-{size}.zarr"),
                               "--max-memory", args.max_memory, "--no-progress"])  # fmt: skip
            row = {"size": size, "max_memory": args.max_memory, "peak_rss_mib": round(peak),
                   "wall_s": round(wall, 1),
                   "megapixels_per_s": round(size * size / 1e6 / wall, 2)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
            source_bytes = sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
            row["input_mib_on_disk"] = round(source_bytes / 2**20)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows},
                                              indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
