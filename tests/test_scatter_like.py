"""``Decomposition.scatter(t, like=y_local)``: a whole tensor sliced like a distributed one
whose global size differs from the input's."""

from __future__ import annotations

from _equivalence import scatter_like_worker
from haloseg.parallel.spawn import run_distributed


def test_scatter_like_a_valid_convolution_output() -> None:
    for r in run_distributed(scatter_like_worker, 4):
        assert r["global"] == (2, 3, 14, 18)  # valid 3x3 convolution of 16 x 20
        assert r["target_equal"] and r["output_equal"], r
        # Both shapes are named, and the plain scatter refuses what it cannot slice.
        assert "(14, 17)" in r["refusal"] and "(14, 18)" in r["refusal"], r["refusal"]
        assert r["plain_refusal"] is not None
