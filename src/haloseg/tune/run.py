"""``run_search``: a search of a base config as parallel trials on Ray Tune, resumable, with
early stopping, retries of crashed trials, and its results table written beside it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from haloseg.config import RunConfig, save_config
from haloseg.errors import ConfigError
from haloseg.tune.cluster import check_fits, node_resources, require_ray
from haloseg.tune.report import Results, collect_results
from haloseg.tune.space import SearchSpec
from haloseg.tune.trainable import TrialSetup, trial_dirname, tune_trial

__all__ = ["TrialFn", "experiment_path", "run_search"]

log = logging.getLogger(__name__)

TrialFn = Callable[[dict[str, Any], TrialSetup], None]
"""What a trial runs: ``trial(values, setup)`` with the values Tune drew for it."""


def experiment_path(base: RunConfig, storage: str | None = None) -> str:
    """Where Tune keeps the experiment: the base config's ``output_dir`` (absolute), or
    ``STORAGE/NAME`` on shared storage (a folder every node sees, or a URI such as s3://)."""
    if storage is None:
        return str(Path(base.output_dir).resolve())
    if "://" in storage:
        return f"{storage.rstrip('/')}/{base.name}"
    return str(Path(storage).resolve() / base.name)


def _param_space(search: SearchSpec) -> dict[str, Any]:
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
    }
    return {p.key: make[p.kind](list(p.values)) for p in search.params}


def max_steps(search: SearchSpec, base: RunConfig) -> int:
    """The most steps any trial runs: the base config's, or the largest searched value."""
    drawn = [v for p in search.params if p.key == "train.steps" for v in p.values]
    return max([base.train.steps, *drawn]) if drawn else base.train.steps


def _scheduler(search: SearchSpec, base: RunConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if search.scheduler == "fifo":
        return FIFOScheduler()
    steps = max_steps(search, base)
    grace = min(search.asha.grace_period or base.train.val_every, steps)
    # Haloseg's step, not Tune's report count: rungs stay put when val_every changes.
    return ASHAScheduler(time_attr="step", max_t=steps, grace_period=grace,
                         reduction_factor=search.asha.reduction_factor)  # fmt: skip


def _trainable(search: SearchSpec, base: RunConfig, path: str, trial: TrialFn, scratch: str) -> Any:
    from ray import tune

    setup = TrialSetup(base.to_dict(), base.parallel.size, search.resources, path, scratch)
    trainable = tune.with_parameters(trial, setup=setup)
    if setup.processes > 1:
        # The trial's own process only waits on its Ray Train workers, which hold the CPUs
        # and GPUs; Tune's concurrency limit keeps the trials within the cluster. (Tune
        # wants some resource for the process: a token amount of memory.)
        return tune.with_resources(trainable, {"cpu": 0, "memory": 2**20})
    return tune.with_resources(
        trainable, {"cpu": search.resources.cpus, "gpu": search.resources.gpus}
    )


def _tuner(search: SearchSpec, base: RunConfig, path: str, concurrent: int,
           progress: bool, trial: TrialFn, scratch: str) -> Any:  # fmt: skip
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    parent, name = path.rstrip("/").rsplit("/", 1)
    return tune.Tuner(
        _trainable(search, base, path, trial, scratch),
        param_space=_param_space(search),
        tune_config=tune.TuneConfig(
            metric=search.metric, mode=search.mode, num_samples=search.samples,
            scheduler=_scheduler(search, base),
            # Tune ignores max_concurrent_trials with its own generator: it takes it here.
            search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=search.seed),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=parent, verbose=1 if progress else 0,
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )  # fmt: skip


def _write_inputs(base: RunConfig, search: SearchSpec, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_config(base, folder / "config.yaml")
    tmp = folder / "search.yaml.tmp"
    tmp.write_text(yaml.safe_dump(_spec(search), sort_keys=False))
    tmp.replace(folder / "search.yaml")


def _spec(search: SearchSpec) -> dict[str, Any]:
    return {"metric": search.metric, "mode": search.mode, "samples": search.samples,
            "seed": search.seed, "scheduler": search.scheduler,
            "space": {p.key: {p.kind: list(p.values)} for p in search.params}}  # fmt: skip


def _check_same_search(search: SearchSpec, folder: Path) -> None:
    """A resumed search must be the one that started: its trials were drawn from it."""
    saved = folder / "search.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text()) != yaml.safe_load(
        yaml.safe_dump(_spec(search), sort_keys=False)
    ):
        raise ConfigError(
            f"--resume with a search that differs from the one {saved} started; resume with "
            "the same --search file, or start the new search in another output_dir"
        )


def run_search(
    base: RunConfig,
    search: SearchSpec,
    *,
    resume: bool = False,
    storage: str | None = None,
    progress: bool = True,
    trial: TrialFn = tune_trial,
) -> Results:
    """Run ``search`` over ``base`` on the Ray this process is connected to (see
    ``ray_cluster``); ``resume`` continues the experiment in its folder without rerunning
    finished trials. The results (best first) are also written to ``base.output_dir`` as
    ``results.csv`` and ``results.png``. ``trial`` is what each trial runs (haloseg's
    ``tune_trial``, or a function that wraps it)."""
    ray = require_ray()
    from ray import tune

    if not ray.is_initialized():
        raise ConfigError("run_search needs Ray running; call it inside ray_cluster(...)")
    path = experiment_path(base, storage)
    concurrent = check_fits(
        search.resources, base.parallel.size, ray.cluster_resources(), node_resources()
    )
    if search.max_concurrent is not None:
        concurrent = min(concurrent, search.max_concurrent)
    folder = Path(base.output_dir).resolve()
    exists = tune.Tuner.can_restore(path)
    if exists and not resume:
        raise ConfigError(
            f"{path} already holds a search; pass --resume to continue it or choose another "
            "output_dir"
        )
    if resume and not exists:
        raise ConfigError(
            f"--resume: no search to resume in {path}; check output_dir (and --storage), or "
            "leave out --resume to start one"
        )
    scratch = tempfile.mkdtemp(prefix="haloseg-tune-")
    name = os.path.basename(scratch)  # each node makes it in its own temporary folder
    try:
        if exists:
            _check_same_search(search, folder)
            log.info("resuming the search in %s", path)
            tuner = tune.Tuner.restore(
                path,
                _trainable(search, base, path, trial, name),
                resume_unfinished=True,
                resume_errored=True,
            )
        else:
            tuner = _tuner(search, base, path, concurrent, progress, trial, name)
            _write_inputs(base, search, folder)
        grid = tuner.fit()
    finally:
        try:
            shutil.rmtree(scratch)
        except OSError as e:
            log.warning("cannot remove the trials' scratch folder %s: %s", scratch, e)
    results = collect_results(grid, search, base)
    results.write(folder)
    return results
