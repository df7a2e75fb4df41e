"""Search files and trials without Ray: every bad search is refused with one line naming the
key, value and fix; a trial reports each validation with its checkpoint, and one restarted
from that checkpoint ends where the uninterrupted trial ends."""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import pytest

from haloseg.cli.main import main
from haloseg.config import load_config
from haloseg.errors import ConfigError, DependencyError
from haloseg.tune import check_fits, load_search, parse_search, run_trial, trial_config
from haloseg.tune.space import Resources, config_keys
from haloseg.tune.trial import install_checkpoint

TINY = [
    "data.shape=[32, 32]", "data.num_images=4", "train.steps=4", "train.val_every=2",
    "model.depth=2", "model.base_channels=4", "device=cpu", "train.dtype=float64",
]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base():
    return load_config(None, TINY)


def _space(**space):
    return {"space": space}


def test_example_search_file_parses():
    cfg = load_config(REPO / "configs" / "ellipses-2d.yaml", ["parallel.grid=null"])
    search = load_search(REPO / "configs" / "search-ellipses.yaml", cfg)
    assert [p.kind for p in search.params] == ["loguniform", "grid", "choice"]
    assert search.trials == 4 and search.metric == "dice_mean" and search.mode == "max"


def test_every_kind_and_fixed_values(base):
    spec = {
        "metric": "val_loss", "seed": 3,
        "space": {"train.lr": {"loguniform": ["1e-4", 1.0e-2]}, "data.noise": {"uniform": [0, 1]},
                  "model.norm": {"choice": ["batch", "group"]}, "train.steps": {"grid": [2, 4]},
                  "train.warmup_steps": 0},
    }  # fmt: skip
    search = parse_search(spec, base)
    kinds = {p.key: (p.kind, p.values) for p in search.params}
    assert kinds["train.lr"] == ("loguniform", (1e-4, 1e-2))  # YAML 1.1's "1e-4" string
    assert kinds["train.warmup_steps"] == ("grid", (0,))
    assert search.mode == "min" and search.trials == 2 and search.scheduler == "asha"


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        (_space(**{"train.lrr": {"grid": [1]}}), ["'train.lrr'", "did you mean 'train.lr'"]),
        (_space(**{"model.width": 8}), ["'model.width'", "did you mean"]),
        ({"space": {}}, ["search space is empty", "train.lr"]),
        ({"metric": "dice_mean"}, ["search space is empty"]),
        ({"spaces": {}}, ["'spaces'", "did you mean 'space'"]),
        (_space(**{"train.lr": {"loguniform": [0, 1]}}), ["low > 0", "uniform"]),
        (_space(**{"train.lr": {"uniform": [1, 0.5]}}), ["low < high"]),
        (_space(**{"train.lr": {"normal": [0, 1]}}), ["grid", "loguniform"]),
        (_space(**{"train.lr": {"grid": []}}), ["non-empty list"]),
        (_space(**{"train.steps": {"uniform": [1, 10]}}), ["train.steps", "not of type int"]),
        (_space(**{"model.norm": {"choice": ["batch", "layer"]}}), ["'layer'", "batch"]),
        (_space(**{"parallel.data": {"grid": [1, 2]}}), ["'parallel.data'", "cannot be searched"]),
        ({**_space(**{"train.lr": 1e-3}), "metric": "accuracy"}, ["accuracy", "dice_mean"]),
        ({**_space(**{"train.lr": 1e-3}), "resources": {"cpu": 1}}, ["did you mean 'cpus'"]),
        ({**_space(**{"train.lr": 1e-3}), "resources": {"cpus": 0}}, ["at least one CPU"]),
        ({**_space(**{"train.lr": 1e-3}), "samples": 0}, ["samples=0", ">= 1"]),
    ],
)  # fmt: skip
def test_bad_search_is_refused(base, spec, names):
    with pytest.raises(ConfigError) as info:
        parse_search(spec, base)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)


def test_config_keys_cover_every_section():
    keys = config_keys()
    assert {"train.lr", "model.base_channels", "data.noise", "parallel.grid", "device"} <= set(keys)


def test_more_resources_than_the_cluster_has():
    assert check_fits(Resources(cpus=1), 1, {"CPU": 2.0}) == 2
    assert check_fits(Resources(cpus=0.5), 2, {"CPU": 2.0}) == 2
    with pytest.raises(ConfigError, match=r"needs 4 CPUs .*x 2 processes.*has 2"):
        check_fits(Resources(cpus=2), 2, {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"needs 1 GPUs .*has 0; lower resources.gpus"):
        check_fits(Resources(cpus=1, gpus=1), 1, {"CPU": 8.0})


def test_a_trial_process_must_fit_on_one_node():
    nodes = [{"CPU": 4.0}, {"CPU": 4.0, "GPU": 1.0}]
    cluster = {"CPU": 8.0, "GPU": 1.0}
    # Whole trials per node: 2 + 2 of 2 CPUs; 1 + 1 of 2.5 CPUs, where the total of 8 says 3.
    assert check_fits(Resources(cpus=2), 1, cluster, nodes) == 4
    assert check_fits(Resources(cpus=2.5), 1, cluster, nodes) == 2
    with pytest.raises(ConfigError, match=r"process needs 6 CPUs .*largest node .* has 4; "
                                          r"lower resources.cpus to at most 4"):  # fmt: skip
        check_fits(Resources(cpus=6), 1, cluster, nodes)
    # Processes of a multi-process trial are placed one by one: 4 of 2 CPUs fit on 2 nodes.
    assert check_fits(Resources(cpus=2), 4, cluster, nodes) == 1


def test_cli_without_ray_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    search = tmp_path / "search.yaml"
    search.write_text("space:\n  train.lr: {grid: [1.0e-3]}\n")
    assert main(["tune", str(tmp_path / "none.yaml"), "--search", str(search)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "haloseg: error: haloseg tune needs Ray: pip install 'haloseg[tune]'"
    with pytest.raises(DependencyError):
        from haloseg.tune import require_ray

        require_ray()


def test_cli_bad_search_is_one_line(tmp_path, capsys):
    pytest.importorskip("ray.tune")
    search = tmp_path / "search.yaml"
    search.write_text("space:\n  train.lrate: {grid: [1.0e-3]}\n")
    argv = ["tune", str(REPO / "configs" / "ellipses-2d.yaml"), "--search", str(search)]
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "did you mean 'train.lr'" in lines[0], lines


def test_trial_config_applies_values(base, tmp_path):
    cfg = trial_config(base.to_dict(), {"train.lr": 0.01, "model.norm": "group"}, tmp_path)
    assert cfg.train.lr == 0.01 and cfg.model.norm == "group"
    assert cfg.output_dir == str(tmp_path) and cfg.train.checkpoint_every == cfg.train.val_every
    assert cfg.data.shape == base.data.shape and cfg.train.dtype == "float64"


class _Recorder:
    """A reporter that keeps each report's metrics and a copy of its checkpoint folder."""

    def __init__(self, keep: Path) -> None:
        self.keep, self.metrics, self.checkpoints = keep, [], []

    def __call__(self, metrics, folder):
        self.metrics.append(metrics)
        copy = self.keep / f"report-{len(self.metrics)}"
        shutil.copytree(folder, copy)
        self.checkpoints.append(copy)


def test_trial_reports_and_restarts_from_its_checkpoint(base, tmp_path):
    whole = _Recorder(tmp_path)
    final = run_trial(trial_config(base.to_dict(), {}, tmp_path / "whole"), whole, threads=1)
    assert [m["step"] for m in whole.metrics] == [2, 4]
    assert all("dice_mean" in m and "val_loss" in m for m in whole.metrics)
    first = whole.checkpoints[0]
    assert sorted(p.name for p in first.iterdir()) == ["latest.json", "step-0000002.pt"]

    restarted = _Recorder(tmp_path / "again")
    (tmp_path / "again").mkdir()
    cfg = trial_config(base.to_dict(), {}, tmp_path / "restarted")
    install_checkpoint(first, cfg)
    again = run_trial(cfg, restarted, threads=1)
    assert [m["step"] for m in restarted.metrics] == [4]
    assert math.isclose(again["val_loss"], final["val_loss"], rel_tol=1e-9)


@pytest.mark.parametrize(
    ("metric", "overrides", "names"),
    [
        ("dice_class7", ["data.num_classes=3"], ["'dice_class7'", "num_classes=3", "dice_class2"]),
        ("dice_class0", ["data.num_classes=3"], ["'dice_class0'", "dice_class1, dice_class2"]),
        ("dice_class01", ["data.num_classes=3"], ["'dice_class01'", "dice_class1, dice_class2"]),
        ("dice_class²", [], ["'dice_class²'", "dice_mean"]),
        ("dice_tumour", ["data.num_classes=3"], ["'dice_tumour'", "data.regions"]),
        ("dice_tumour", ["data.num_classes=3", "data.regions={core: [1, 2]}"], ["dice_core"]),
    ],
)  # fmt: skip
def test_metric_the_trials_do_not_report_is_refused(metric, overrides, names):
    cfg = load_config(None, [*TINY, *overrides])
    with pytest.raises(ConfigError) as info:
        parse_search({**_space(**{"train.lr": 1e-3}), "metric": metric}, cfg)
    for name in names:
        assert name in str(info.value), (name, str(info.value))


@pytest.mark.parametrize(
    ("metric", "overrides"),
    [
        ("dice_class2", ["data.num_classes=3"]),
        ("dice_core", ["data.num_classes=3", "data.regions={core: [1, 2]}"]),
        ("dice_class5", []),  # how many classes is up to the dataset
    ],
)
def test_metric_the_trials_report_is_accepted(metric, overrides):
    cfg = load_config(None, [*TINY, *overrides])
    search = parse_search({**_space(**{"train.lr": 1e-3}), "metric": metric}, cfg)
    assert search.metric == metric


def _tune_example(*flags: str, overrides: tuple[str, ...] | list[str] = ()) -> list[str]:
    """``haloseg tune`` of the example config and search, with ``flags``."""
    configs = REPO / "configs"
    return ["tune", str(configs / "ellipses-2d.yaml"), *overrides,
            "--search", str(configs / "search-ellipses.yaml"), *flags]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--cpus", "-1"], ["--cpus -1", "at least 1 CPU"]),
        (["--gpus", "-2"], ["--gpus -2", "cannot be negative"]),
        (["--address", "head-node"], ["'head-node'", "HOST:PORT"]),
        (["--address", "10.0.0.5:99999"], ["'10.0.0.5:99999'", "HOST:PORT"]),
        (["--address", "10.0.0.5:6379", "--cpus", "2"], ["--cpus 2", "leave out --cpus"]),
    ],
)
def test_bad_cluster_flags_exit_2_in_one_line(flags, names, capsys):
    assert main(_tune_example(*flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    for name in names:
        assert name in err[0], (name, err[0])


def test_an_address_where_nothing_listens_fails_at_once(capsys):
    from haloseg.parallel.spawn import free_port

    pytest.importorskip("ray")
    for address in (f"127.0.0.1:{free_port()}", f"[::1]:{free_port()}"):
        start = time.perf_counter()
        assert main(_tune_example("--address", address, overrides=["parallel.grid=null"])) == 2
        assert time.perf_counter() - start < 30
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"cannot reach the Ray cluster at --address {address}" in err[0]


def test_cluster_addresses_ray_reads_are_accepted():
    from haloseg.tune.cluster import check_cluster_flags

    for address in ("auto", "127.0.0.1:6379", "ray://head.cluster:10001", "node-1:6379",
                    "[::1]:6379", "ray://[fe80::1]:10001"):  # fmt: skip
        check_cluster_flags(address, None, None)
    check_cluster_flags(None, 2, 0)
