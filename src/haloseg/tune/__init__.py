"""Experiment parallelism: searches over config keys as parallel trials on Ray Tune, each
trial possibly a multi-process Ray Train run (optional extra ``haloseg[tune]``)."""

from haloseg.tune.cluster import check_fits, ray_cluster, require_ray
from haloseg.tune.report import Results
from haloseg.tune.run import experiment_path, run_search
from haloseg.tune.space import SearchSpec, load_search, parse_search
from haloseg.tune.trainable import TrialSetup, tune_trial
from haloseg.tune.trial import run_trial, trial_config

__all__ = [
    "Results",
    "SearchSpec",
    "TrialSetup",
    "check_fits",
    "experiment_path",
    "load_search",
    "parse_search",
    "ray_cluster",
    "require_ray",
    "run_search",
    "run_trial",
    "trial_config",
    "tune_trial",
]
