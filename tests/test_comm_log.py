"""Telling waiting for a late rank from the cost of the messages (the benchmark's split)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

import haloseg
from haloseg.bench.spatial import markdown, report, run_spatial_benchmark
from haloseg.parallel.spawn import run_distributed
from haloseg.parallel.timing import late_waits, log_collectives


def test_late_waits_counts_time_before_the_last_arrival() -> None:
    # Call 0: rank 1 arrives 3 s after rank 0; both leave at 5. Call 1: rank 0 is late by 1.
    logs = [
        [("norm", 1.0, 5.0), ("reduce", 10.0, 10.5)],
        [("norm", 4.0, 5.0), ("reduce", 9.0, 10.5)],
    ]
    assert late_waits(logs) == pytest.approx([3.0, 1.0])


def test_late_waits_never_exceeds_the_call() -> None:
    # A call that ended before the last arrival (clock skew, a one-sided message) counts only
    # its own length; a rank arriving last waits for nobody.
    logs = [[("norm", 0.0, 0.5)], [("norm", 2.0, 2.1)]]
    assert late_waits(logs) == pytest.approx([0.5, 0.0])


def test_late_waits_refuses_logs_of_other_calls() -> None:
    with pytest.raises(ValueError, match="rank 1 logged 1 group-wide calls .* from call 0 on"):
        late_waits([[("norm", 0.0, 1.0)], [("reduce", 0.0, 1.0)]])
    with pytest.raises(ValueError, match="rank 1 logged 1 group-wide calls and rank 0 2, "
                                         "differing from call 1 on"):  # fmt: skip
        late_waits([[("norm", 0.0, 1.0), ("norm", 2.0, 3.0)], [("norm", 0.0, 1.0)]])


def test_one_log_at_a_time() -> None:
    with log_collectives(), pytest.raises(RuntimeError, match="already recording"):
        with log_collectives():
            pass
    with log_collectives() as log:  # the first one ended: a new one may start
        assert log == []


def _late_rank(delay: float) -> tuple[list[Any], list[Any]]:
    dec = haloseg.Decomposition((1, 2))
    t = torch.ones(3)
    with log_collectives() as log:
        if dec.rank == 1:
            time.sleep(delay)
        haloseg.global_sum(t, dec)
        haloseg.global_sum(t, dec)
    logs: list[Any] = [None] * dec.size
    dist.all_gather_object(logs, log)
    return logs, late_waits(logs)


def test_a_late_rank_is_measured_on_the_others() -> None:
    results = run_distributed(_late_rank, 2, 0.3)
    logs, waits = results[0]
    assert [kind for kind, _, _ in logs[0]] == ["reduce", "reduce"]
    assert waits == results[1][1]  # every rank computes the same split
    assert 0.25 < waits[0] < 1.0  # rank 0 waited for rank 1's sleep at the first sum
    assert waits[1] < 0.05


def test_benchmark_reports_the_split() -> None:
    # The program end to end on a small image; what the split means is tested above.
    rows = report(run_spatial_benchmark(["2d-128"], [2], 1, ["default"]))
    assert [(r["mode"], r["memory_format"]) for r in rows] == [
        (mode, fmt) for fmt in ("contiguous", "channels_last")
        for mode in ("plain PyTorch", "haloseg 1x2")
    ]  # fmt: skip
    assert rows[1]["comm_s"]["norm"] > 0 and rows[1]["transfer_share"] > 0
    # Each row against plain PyTorch in its own format, and against the faster of the two.
    assert min(rows[0]["time_vs_best_plain"], rows[2]["time_vs_best_plain"]) == 1.0
    table = markdown(rows)
    assert "| late wait | transfer | cpu spread |" in table
    assert "| haloseg 1x2 | channels-last |" in table
