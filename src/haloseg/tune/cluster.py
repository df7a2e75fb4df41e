"""Ray for a search: a local instance started on the spot (loopback only, no dashboard), or
an existing cluster joined by address; and the check that one trial fits in it."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from types import ModuleType
from unittest import mock

from haloseg.errors import ConfigError, DependencyError
from haloseg.tune.space import Resources

__all__ = ["check_cluster_flags", "check_fits", "node_resources", "ray_cluster", "require_ray"]

log = logging.getLogger(__name__)

# Ray's own environment for a quiet local instance: one line per repeated worker message.
_QUIET = {"RAY_DEDUP_LOGS": "1"}


def require_ray() -> ModuleType:
    """The ``ray`` module with Tune and Train, or the error that names the extra to install."""
    try:
        import ray
        import ray.train  # noqa: F401
        import ray.tune  # noqa: F401
    except ImportError:
        raise DependencyError("haloseg tune needs Ray: pip install 'haloseg[tune]'") from None
    return ray


_ADDRESS = re.compile(r"(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})")
"""HOST:PORT or ray://HOST:PORT, HOST a name, an IPv4 address or a bracketed IPv6 one."""


def _host_port(address: str) -> tuple[str, int] | None:
    """``address``'s host (IPv6 without brackets) and port, or None if Ray cannot read it."""
    match = _ADDRESS.fullmatch(address)
    if match is None or not 0 < int(match.group(2)) < 65536:
        return None
    return match.group(1).strip("[]"), int(match.group(2))


def check_cluster_flags(address: str | None, cpus: int | None, gpus: int | None) -> None:
    """One-line errors for a cluster address Ray cannot read and for impossible resources."""
    if address is not None:
        if address != "auto" and _host_port(address) is None:
            raise ConfigError(
                f"--address {address!r} is not auto, HOST:PORT or ray://HOST:PORT; give the "
                "head node's address, e.g. --address 10.0.0.5:6379"
            )
        for flag, value in (("--cpus", cpus), ("--gpus", gpus)):
            if value is not None:
                raise ConfigError(
                    f"{flag} {value} sizes a local Ray instance, but --address joins a "
                    f"cluster that has its own; leave out {flag} (or --address)"
                )
    if cpus is not None and cpus < 1:
        raise ConfigError(f"--cpus {cpus}: a local Ray instance needs at least 1 CPU; give a "
                          "positive number, or leave it out to use every CPU")  # fmt: skip
    if gpus is not None and gpus < 0:
        raise ConfigError(f"--gpus {gpus}: the number of GPUs cannot be negative; give 0 or "
                          "more, or leave it out to use every GPU")  # fmt: skip


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A one-line error at once for an address where nothing listens (Ray itself would keep
    retrying for minutes)."""
    host_port = _host_port(address)
    assert host_port is not None  # check_cluster_flags ran first
    try:
        socket.create_connection(host_port, timeout=timeout).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(
            f"cannot reach the Ray cluster at --address {address} ({reason}); check that the "
            "head node runs ('ray start --head') and its port, or leave out --address for a "
            "local instance"
        ) from None


@contextlib.contextmanager
def ray_cluster(
    address: str | None = None,
    *,
    cpus: int | None = None,
    gpus: int | None = None,
    verbose: bool = False,
    notify: Callable[[str], None] = log.info,
) -> Iterator[dict[str, float]]:
    """Ray started on this machine (``address`` None) or joined at ``address``, for the
    duration of the block; yields the cluster's resources. A Ray already initialised in this
    process is used as it is and left running."""
    check_cluster_flags(address, cpus, gpus)
    if address not in (None, "auto"):
        _check_reachable(address)
    ray = require_ray()
    for key, value in _QUIET.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if address is None:
        cpus = cpus or len(os.sched_getaffinity(0))
        notify(f"starting a local Ray instance on 127.0.0.1 ({cpus} CPUs, no dashboard); "
               "this takes a few seconds")  # fmt: skip
        # Ray resolves 127.0.0.1 to the machine's outward address, and its services listen
        # on every interface, unless it believes clusters are off (its setting for desktops):
        # then each of them binds to the loopback address only.
        # The constant is read when ray is imported (before this), the variable by the
        # processes Ray starts: both must say so.
        constants = ray._private.ray_constants
        with (
            mock.patch.dict(os.environ, {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}),
            mock.patch.object(constants, "ENABLE_RAY_CLUSTER", False),
        ):
            ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
                     **quiet)  # fmt: skip
    else:
        notify(f"joining the Ray cluster at {address}")
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as e:
            reason = str(e).split(". ")[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"cannot join the Ray cluster at --address {address} ({reason}); start it with "
                "'ray start --head' or leave out --address for a local instance"
            ) from None
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


def check_fits(
    resources: Resources,
    processes: int,
    cluster: dict[str, float],
    nodes: list[dict[str, float]] | None = None,
) -> int:
    """How many trials of ``processes`` processes holding ``resources`` each fit in
    ``cluster`` at once; an error when not even one does. With ``nodes`` (each live node's
    resources), a process must also fit on one node: Ray places each whole."""
    trials = []
    for name, key in (("cpus", "CPU"), ("gpus", "GPU")):
        need, have = getattr(resources, name) * processes, cluster.get(key, 0.0)
        if need > have:
            per = f" x {processes} processes" if processes > 1 else ""
            raise ConfigError(
                f"a trial needs {need:g} {key}s (resources.{name}={getattr(resources, name):g}"
                f"{per}) but the Ray cluster has {have:g}; lower resources.{name}, the "
                "processes per trial (parallel.grid, parallel.data), or use a larger cluster "
                "(--address, or --cpus/--gpus for a local one)"
            )
        one = getattr(resources, name)
        largest = max((n.get(key, 0.0) for n in nodes), default=0.0) if nodes else one
        if one > largest:  # without nodes, the total above is the only bound
            raise ConfigError(
                f"a trial process needs {one:g} {key}s (resources.{name}={one:g}) but the "
                f"largest node of the Ray cluster has {largest:g}; lower resources.{name} to "
                f"at most {largest:g}, or add a node that large"
            )
        if need > 0:
            if nodes and processes == 1:  # whole trials per node
                trials.append(sum(int(n.get(key, 0.0) // need) for n in nodes))
            else:
                trials.append(int(have // need))
    return max(1, min(trials))


def node_resources() -> list[dict[str, float]]:
    """The resources of each live node of the Ray this process is connected to."""
    ray = require_ray()
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
