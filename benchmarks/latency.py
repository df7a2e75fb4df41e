"""Latency of one small exchange between ranks, right after a stretch of compute.

    python benchmarks/latency.py [--ranks 2] [--work-ms 0 5 20] [--repeats 100] [--json out.json]

Every rank computes for ``work`` milliseconds (matrix products, the same on every rank), then
all ranks exchange a statistics-sized tensor (48 floats) with haloseg's ``gather_small``: the
pattern of a normalisation layer. The time of the exchange is what a rank waits when it
arrives with the others: the cost of the message, including waking a rank that slept. On
virtual machines whose idle cores halt, that wake-up grows once the ranks computed before.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from haloseg.parallel.spawn import run_distributed
from haloseg.parallel.transport import gather_small


def _worker(work_ms: float, repeats: int) -> list[float]:
    rank, size = dist.get_rank(), dist.get_world_size()
    stats, a = torch.zeros(3, 16), torch.randn(256, 256)
    dist.barrier()
    waits = []
    for _ in range(repeats):
        start = time.perf_counter()
        while (time.perf_counter() - start) * 1e3 < work_ms:
            a @ a
        start = time.perf_counter()
        gather_small(stats, rank, list(range(size)), None)
        waits.append(time.perf_counter() - start)
    return waits


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--work-ms", type=float, nargs="+", default=[0.0, 5.0, 20.0])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    print("| ranks | compute before (ms) | median exchange (ms) | mean (ms) | max (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for work in args.work_ms:
        per_rank = run_distributed(_worker, args.ranks, work, args.repeats)
        waits = [w * 1e3 for r in per_rank for w in r]
        rows.append({"ranks": args.ranks, "work_ms": work, "median_ms": statistics.median(waits),
                     "mean_ms": statistics.mean(waits), "max_ms": max(waits)})  # fmt: skip
        r = rows[-1]
        print(f"| {r['ranks']} | {work:g} | {r['median_ms']:.2f} | {r['mean_ms']:.2f} | "
              f"{r['max_ms']:.2f} |", flush=True)  # fmt: skip
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps({"command": "python benchmarks/latency.py", "rows": rows},
                                  indent=2))  # fmt: skip
        tmp.replace(args.json)
    return rows


if __name__ == "__main__":
    main()
