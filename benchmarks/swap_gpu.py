"""Activation swapping on a GPU: how much larger a volume trains, and what it costs when it fits.

    python benchmarks/swap_gpu.py [--preset large] [--device-memory 8GB] [--json out.json]
    python benchmarks/swap_gpu.py --smoke          # tiny sizes on CPU, to check the program

A 3-D haloseg U-Net (batch 1, fp32, 1 input channel, 3 classes, cross entropy on random labels,
AdamW) trains on cubic volumes whose edge is a multiple of 2**depth:

1. exactness: one fp64 step of a small U-Net with each policy equals the step without swapping;
2. the largest edge whose training step fits, without swapping and with the policies ``all``
   and ``skips``: the edge doubles until a step runs out of memory, then bisects. The device is
   capped at ``--device-memory`` with ``torch.cuda.set_per_process_memory_fraction`` because
   host memory must hold what is swapped; edges whose swapped bytes would not fit in host memory
   (measured bytes per voxel, pinned blocks rounded up to powers of two) are not tried;
3. the median step time at an edge that fits without swapping, for no swapping, ``budget``
   (budget = the device memory: swaps nothing), ``skips`` and ``all``, with the peak device
   memory of each (``torch.cuda.max_memory_allocated``).

``ckpt`` checkpoints every U-Net level (``checkpoint_levels``) without swapping, ``all+ckpt``
does both; they take part in all three parts (``--policies ckpt all+ckpt`` for the search).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:
    import zarr  # noqa: F401
except ImportError:  # a bare GPU machine: haloseg imports zarr, which this program never uses
    import types

    sys.modules["zarr"] = types.ModuleType("zarr")
    sys.modules["zarr"].Group = sys.modules["zarr"].Array = object  # type: ignore[attr-defined]

from haloseg.inference.budget import parse_bytes  # noqa: E402
from haloseg.memory.checkpoint import checkpoint_levels  # noqa: E402
from haloseg.memory.swap import ActivationSwapper  # noqa: E402
from haloseg.models import PRESETS, unet_preset  # noqa: E402

POLICIES = {
    "none": None,
    "budget": {"policy": "budget"},
    "skips": {"policy": "skips"},
    "all": {"policy": "all"},
    "ckpt": None,
    "all+ckpt": {"policy": "all"},
}
CHECKPOINTED = ("ckpt", "all+ckpt")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        # A backward that ran out of memory leaves tasks holding gradients in the queue of
        # autograd's device thread until it wakes up: a one-element backward wakes it.
        torch.ones(1, device=device, requires_grad=True).sum().backward()
        torch.cuda.empty_cache()
        # Pinned blocks cached by PyTorch's host allocator would otherwise pile up from one
        # volume size to the next.
        getattr(torch._C, "_host_emptyCache", lambda: None)()


def _swapper(model: torch.nn.Module, policy: str, args: argparse.Namespace) -> Any:
    kwargs = POLICIES[policy]
    if kwargs is None:
        return None
    if policy == "budget":
        kwargs = {**kwargs, "budget": args.device_memory_bytes}
    return ActivationSwapper(model, prefetch=args.prefetch, **kwargs)


def _step(model: Any, opt: Any, x: Any, labels: Any, swapper: Any) -> None:
    opt.zero_grad(set_to_none=True)
    with swapper if swapper is not None else contextlib.nullcontext():
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
    opt.step()


def _data(edge: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(edge)
    x = torch.randn(1, 1, edge, edge, edge, device=device, generator=gen)
    labels = torch.randint(0, 3, (1, edge, edge, edge), device=device, generator=gen)
    return x, labels


def _run_steps(setup: tuple, edge: int, policy: str, steps: int, args: argparse.Namespace) -> dict:
    """Run ``steps`` steps; the times, peak device memory and swapped bytes of the last one."""
    model, opt, device = setup
    x, labels = _data(edge, device)
    swapper = _swapper(model, policy, args)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        _step(model, opt, x, labels, swapper)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    stats = swapper.stats if swapper is not None else None
    return {
        "times": times,
        "peak_gib": None if peak is None else peak / 2**30,
        "swapped_gib": stats.bytes_out / 2**30 if stats else 0.0,
        "tensors_swapped": stats.tensors_swapped if stats else 0,
    }


def _fits_here(setup: tuple, edge: int, policy: str, args: argparse.Namespace) -> dict | None:
    try:
        return _run_steps(setup, edge, policy, 1, args)
    except torch.OutOfMemoryError:
        return None
    finally:
        _free(setup[2])


def _fits_in_child(edge: int, policy: str, args: argparse.Namespace) -> dict | None:
    """One step in a fresh process: nothing an earlier out-of-memory left behind can count."""
    cmd = [sys.executable, __file__, "--trial", f"{policy}:{edge}", "--preset", args.preset,
           "--device-memory", args.device_memory, "--prefetch", str(args.prefetch)]  # fmt: skip
    done = subprocess.run(cmd + ["--smoke"] * args.smoke, capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("TRIAL "):
            return json.loads(line[len("TRIAL ") :])
    raise SystemExit(f"trial {policy}:{edge} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")


def _trial(args: argparse.Namespace) -> None:
    policy, edge = args.trial.split(":")
    use_cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    setup = _setup(args, device, checkpoint=policy in CHECKPOINTED)
    print("TRIAL " + json.dumps(_fits_here(setup, int(edge), policy, args)), flush=True)


def _setup(args: argparse.Namespace, device: torch.device, checkpoint: bool = False) -> tuple:
    """Model (its levels checkpointed if ``checkpoint``) and AdamW with its state already
    allocated; the device capped on CUDA."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, args.device_memory_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    torch.manual_seed(0)
    model = unet_preset(args.preset, spatial_dims=3, in_channels=1, out_channels=3,
                        **_overrides(args)).to(device)  # fmt: skip
    if checkpoint:
        checkpoint_levels(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # the moments exist from now on, as in every step after the first
    opt.zero_grad(set_to_none=True)
    return model, opt, device


def _overrides(args: argparse.Namespace) -> dict:
    return {"depth": 2, "base_channels": 4, "convs_per_level": 1} if args.smoke else {}


def largest_edge(setup: tuple | None, policy: str, args: argparse.Namespace) -> dict:
    """Double the edge until a step fails, then bisect (in multiples of 2**depth).

    With ``setup`` None each step runs in a process of its own (CUDA); else in this one.
    """
    unit = 2 ** {**PRESETS[args.preset], **_overrides(args)}["depth"]
    host_limit = args.host_memory_bytes
    good, bad, best, host_limited = 0, None, None, False
    # Batch norm needs more than one voxel per channel at the bottleneck: start at 2**depth * 2.
    edge = 2 * unit
    per_voxel = 0.0

    def attempt(e: int) -> bool:
        nonlocal best, per_voxel, host_limited
        # Host pinned blocks are rounded up to powers of two: ask for at most half the host.
        if per_voxel * e**3 * 2 > host_limit:
            host_limited = True
            print(f"  {policy}: edge {e} not tried, its swap would not fit in host memory")
            return False
        start = time.perf_counter()
        if setup is None:
            result = _fits_in_child(e, policy, args)
        else:
            result = _fits_here(setup, e, policy, args)
        outcome = "fits" if result else "out of memory"
        print(f"  {policy}: edge {e} {outcome} ({time.perf_counter() - start:.1f} s)", flush=True)
        if result is None:
            return False
        best = {**result, "edge": e}
        per_voxel = max(per_voxel, result["swapped_gib"] * 2**30 / e**3)
        return True

    while edge <= args.max_edge and attempt(edge):
        good, edge = edge, edge * 2
    bad = edge if edge <= args.max_edge else None
    hi = bad if bad is not None else args.max_edge + unit
    while hi - good > unit:
        mid = (good + hi) // 2 // unit * unit
        if attempt(mid):
            good = mid
        else:
            hi = mid
    if best is None or best["edge"] != good:
        best = {"edge": good, "peak_gib": None, "swapped_gib": None}
    return {
        "policy": policy,
        "edge": good,
        "voxels": good**3,
        "peak_gib": best.get("peak_gib"),
        "swapped_gib": best.get("swapped_gib"),
        "host_limited": host_limited,
        "max_edge_reached": good >= args.max_edge,
    }


def step_times(
    setup: tuple, edge: int, args: argparse.Namespace, policies: list[str]
) -> list[dict]:
    rows = []
    for policy in policies:
        result = _run_steps(setup, edge, policy, args.warmup + args.steps, args)
        _free(setup[2])
        times = result["times"][args.warmup :]
        rows.append({
            "policy": policy, "edge": edge, "median_s": statistics.median(times),
            "min_s": min(times), "peak_gib": result["peak_gib"],
            "swapped_gib": result["swapped_gib"], "tensors_swapped": result["tensors_swapped"],
        })  # fmt: skip
        print(f"  {policy}: {rows[-1]['median_s']:.3f} s/step", flush=True)
    return rows


def exactness(device: torch.device) -> list[dict]:
    """One fp64 step of a small U-Net with each policy against the same step without."""
    torch.backends.cudnn.deterministic = True
    edge = 32
    x, labels = _data(edge, device)
    x = x.double()
    rows = []
    ref = None
    for policy in POLICIES:
        torch.manual_seed(0)
        model = unet_preset("small", spatial_dims=3, in_channels=1, out_channels=3, depth=2)
        model = model.double().to(device)
        if policy in CHECKPOINTED:
            checkpoint_levels(model)
        args = argparse.Namespace(prefetch=2, device_memory_bytes=1 << 40)
        swapper = _swapper(model, policy, args)
        xi = x.clone().requires_grad_()
        with swapper if swapper is not None else contextlib.nullcontext():
            loss = F.cross_entropy(model(xi), labels)
            loss.backward()
        flat = torch.cat([loss.detach().reshape(1), xi.grad.reshape(-1),
                          *(p.grad.reshape(-1) for p in model.parameters()),
                          *(b.reshape(-1).double() for b in model.buffers())])  # fmt: skip
        ref = flat if ref is None else ref
        rows.append({
            "policy": policy, "bit_equal": bool(torch.equal(flat, ref)),
            "max_abs_diff": (flat - ref).abs().max().item(),
            "swapped_mib": swapper.stats.bytes_out / 2**20 if swapper else 0.0,
        })  # fmt: skip
    torch.backends.cudnn.deterministic = False
    return rows


def _machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "host_memory_gib": round(_host_memory() / 2**30, 1)}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info.update(gpu=None, processor=platform.processor() or platform.machine())
    return info


def _host_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _print_table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(c)
        for row in cells:
            table.add_row(*row)
        Console(width=160).print(table)
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        print(f"\n{title}")
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.3g}"
    return str(value)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="large", choices=sorted(PRESETS))
    parser.add_argument("--device-memory", default="8GB", help="device memory cap (CUDA)")
    parser.add_argument("--host-fraction", type=float, default=0.8,
                        help="share of available host memory for swapped tensors")  # fmt: skip
    parser.add_argument("--max-edge", type=int, default=512)
    parser.add_argument("--fit-edge", type=int, default=None,
                        help="edge of the timing runs (default: largest without swap)")  # fmt: skip
    parser.add_argument("--policies", nargs="+", default=["all", "skips"],
                        choices=["all", "skips", *CHECKPOINTED],
                        help="policies of the volume search")  # fmt: skip
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, no memory cap")
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--trial", help=argparse.SUPPRESS)  # POLICY:EDGE, one step in a child
    args = parser.parse_args(argv)
    if args.smoke:
        args.max_edge, args.warmup, args.steps = 24, 1, 2
    args.device_memory_bytes = parse_bytes(args.device_memory)
    args.host_memory_bytes = int(_host_memory() * args.host_fraction)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    if args.trial:
        _trial(args)
        return {}
    use_cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    result: dict[str, Any] = {"command": " ".join(["python", *sys.argv]),
                              "machine": _machine(device), "preset": args.preset}  # fmt: skip
    print("exactness (fp64, small U-Net, edge 32):", flush=True)
    result["exactness"] = exactness(device)
    _print_table("swapping = no swapping, fp64", result["exactness"])
    _save(result, args)

    def local(policy: str) -> tuple | None:  # on CPU the trials run in this process
        return None if use_cuda else _setup(args, device, checkpoint=policy in CHECKPOINTED)

    if use_cuda:
        result["device_memory_cap_gib"] = round(args.device_memory_bytes / 2**30, 2)
        print(f"device memory capped at {args.device_memory} with "
              "torch.cuda.set_per_process_memory_fraction", flush=True)  # fmt: skip

    print(f"largest volume, U-Net preset {args.preset!r}:", flush=True)
    largest = [largest_edge(local("none"), "none", args)]
    largest += [largest_edge(local(policy), policy, args) for policy in args.policies]
    for row in largest:
        row["voxel_ratio"] = row["voxels"] / max(largest[0]["voxels"], 1)
    result["largest"] = largest
    _print_table(f"largest cubic volume (device capped at {args.device_memory})", largest)
    _save(result, args)

    setup = _setup(args, device)
    result["parameters"] = sum(p.numel() for p in setup[0].parameters())
    edge = args.fit_edge or largest[0]["edge"]
    print(f"step time at edge {edge}:", flush=True)
    plain = [p for p in POLICIES if p not in CHECKPOINTED]
    timing = step_times(setup, edge, args, plain)
    del setup  # one model at a time under the memory cap
    _free(device)
    timing += step_times(_setup(args, device, checkpoint=True), edge, args, list(CHECKPOINTED))
    for row in timing:
        row["vs_none"] = row["median_s"] / timing[0]["median_s"]
    result["timing"] = timing
    _print_table(f"median step time at edge {edge}, {args.steps} steps after "
                 f"{args.warmup} warm-up", result["timing"])  # fmt: skip
    _save(result, args)
    return result


def _save(result: dict, args: argparse.Namespace) -> None:
    # Written after each part, so that a run stopped early still leaves what it measured.
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
