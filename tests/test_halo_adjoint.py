"""Adjoint tests <F x, y> = <x, F* y>, summed over ranks, of the halo exchange and of the
partitioned convolutions that use it (fp64), in contiguous and channels-last layouts."""

from __future__ import annotations

from _equivalence import adjoint_worker, conv_adjoint_worker
from haloseg.parallel.spawn import run_distributed

GAP = 1e-12


def test_halo_exchange_is_adjoint() -> None:
    cases = [
        ((2, 2), 0.0, False, False),
        ((2, 2), "reflect", False, False),
        ((2, 2), 0.0, True, False),
        ((2, 2), 0.0, False, True),
        ((2, 2), "replicate", False, True),
        ((1, 2, 2), 0.0, False, True),
        ((1, 2, 2), "reflect", False, True),
    ]
    for r in run_distributed(adjoint_worker, 4, cases):
        assert len(r["gaps"]) == len(cases)
        assert max(r["gaps"].values()) < GAP, r["gaps"]
        # A channels-last block gives a channels-last window and gradient.
        assert len(r["formats"]) == 4
        assert all(all(f) for f in r["formats"].values()), r["formats"]


def test_partitioned_convolutions_are_adjoint() -> None:
    for r in run_distributed(conv_adjoint_worker, 4):
        assert max(r["gaps"].values()) < GAP, r["gaps"]
        for key, function in r["functions"].items():
            want = "BandedConvBackward" if key.startswith("banded") else "_HaloConvBackward"
            assert function == want, (key, function)
        # A channels-last block gives a channels-last output and input gradient on both paths.
        for key, formats in r["formats"].items():
            channels_last = key.endswith("cl=True")
            assert formats == (channels_last, channels_last), (key, formats)
