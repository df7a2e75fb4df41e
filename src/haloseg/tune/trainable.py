"""What Ray runs for a trial: ``tune_trial`` in Tune's trial process, and, for a trial whose
config needs several processes, a Ray Train ``TorchTrainer`` of that many workers inside it.

Ray Train joins its workers into a torch.distributed process group before the training
function starts; ``init_layout`` then takes that group as it finds it (as under torchrun), so
the spatial and data-parallel engines run unchanged. Checkpoints travel as folders: a trial
reports the folder of the checkpoint of each validation, Ray copies it to the experiment's
storage, and hands it back to the restarted (retried, resumed) trial.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from haloseg.tune.space import Resources
from haloseg.tune.trial import Reporter, install_checkpoint, run_trial, trial_config

__all__ = ["TrialSetup", "trial_dirname", "tune_trial"]


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of an experiment shares."""

    base: dict[str, Any]
    """The base config (``RunConfig.to_dict()``)."""
    processes: int
    """Processes of one trial (``parallel.data`` x the grid's product)."""
    resources: Resources
    """CPUs and GPUs of each process."""
    storage: str
    """The experiment's folder or URI (where multi-process trials keep their Train runs)."""
    scratch: str | None = None
    """Name of the folder, in each node's temporary folder, that holds the trials' run
    folders; the driver's node removes its own when the search ends (a trial that ASHA
    stops is killed before it can clean up). The temporary folder itself if None."""

    @property
    def threads(self) -> int:
        return max(1, int(self.resources.cpus))


def trial_dirname(trial: Any) -> str:
    """Tune's folder name for ``trial``: short, and the same when the experiment resumes."""
    return f"trial-{trial.trial_id}"


def _train_here(
    values: dict[str, Any], setup: TrialSetup, checkpoint: Any, report: Reporter
) -> None:
    """Run one process of a trial in a scratch folder, from ``checkpoint`` if Ray has one."""
    scratch = None
    if setup.scratch is not None:  # this node's own temporary folder
        scratch = os.path.join(tempfile.gettempdir(), setup.scratch)
        os.makedirs(scratch, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="haloseg-trial-", dir=scratch) as tmp:
        cfg = trial_config(setup.base, values, Path(tmp) / "run")
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                install_checkpoint(folder, cfg)
        run_trial(cfg, report, threads=setup.threads)


def _tune_report(metrics: dict[str, float], folder: Path | None) -> None:
    from ray import tune

    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)


def _train_report(metrics: dict[str, float], folder: Path | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
    ray.train.report(metrics, checkpoint=checkpoint)


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a multi-process trial."""
    import ray.train

    _train_here(config["values"], config["setup"], ray.train.get_checkpoint(), _train_report)


def _train_run(values: dict[str, Any], setup: TrialSetup) -> None:
    """The trial as a Ray Train run of ``setup.processes`` workers, reporting through Tune.

    The Train run keeps its checkpoints under the experiment, named after the trial: when
    Tune restarts the trial, the new ``TorchTrainer`` finds them and resumes.
    """
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    gpus = setup.resources.gpus
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"values": values, "setup": setup},
        # Small CPU tensors (agreement flags, metric sums) go through gloo on GPUs too.
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if gpus else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=setup.processes, use_gpu=gpus > 0,
            resources_per_worker={"CPU": setup.resources.cpus, "GPU": gpus},
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{tune.get_context().get_trial_id()}", storage_path=setup.storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )  # fmt: skip
    trainer.fit()


def tune_trial(values: dict[str, Any], setup: TrialSetup) -> None:
    """Tune's function trainable: one trial with the sampled config ``values``."""
    from ray import tune

    if setup.processes > 1:
        _train_run(values, setup)
    else:
        _train_here(values, setup, tune.get_checkpoint(), _tune_report)
