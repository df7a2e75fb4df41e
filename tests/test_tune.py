"""``haloseg tune`` on a local Ray of 2 CPUs: a 2-trial search completes, a trial that crashes
once is retried from its checkpoint, and a killed search resumes without rerunning its
finished trials."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.tune")

from haloseg.cli.main import main  # noqa: E402
from haloseg.config import load_config  # noqa: E402
from haloseg.tune import parse_search, ray_cluster, run_search, tune_trial  # noqa: E402

TINY = [
    "data.shape=[32, 32]", "data.num_images=4", "train.steps=4", "train.val_every=2",
    "model.depth=2", "model.base_channels=4", "device=cpu",
]  # fmt: skip
SEARCH = {"scheduler": "fifo", "space": {"train.lr": {"grid": [1.0e-3, 3.0e-3]}}}


@pytest.fixture(scope="module")
def ray_2cpus():
    """One local Ray of 2 CPUs for the module (the killed search's too), its files in a
    folder removed at the end."""
    # Short: Ray's socket paths live under it and must fit in 107 characters.
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RAY_TMPDIR", folder)
            with ray_cluster(cpus=2) as resources:
                yield resources
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _steps(trial: Path) -> list[int]:
    """The steps of a trial's reports, from Tune's record of them."""
    return [json.loads(line)["step"] for line in (trial / "result.json").read_text().splitlines()]


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_two_trials_complete_on_two_cpus(ray_2cpus, tmp_path):
    import ray

    assert ray_2cpus["CPU"] == 2
    assert ray.util.get_node_ip_address() == "127.0.0.1"  # the local Ray stays on loopback
    base = load_config(None, [*TINY, f"output_dir={tmp_path / 'search'}"])
    results = run_search(base, parse_search(SEARCH, base), progress=False)
    assert [r["status"] for r in results.rows] == ["done", "done"]
    assert sorted(r["train.lr"] for r in results.rows) == [1e-3, 3e-3]
    assert all(r["step"] == 4 and 0 <= r["dice_mean"] <= 1 for r in results.rows)
    folder = tmp_path / "search"
    assert [r["trial"] for r in _rows(folder)] == [r["trial"] for r in results.rows]
    assert (folder / "results.png").stat().st_size > 0
    trials = sorted(folder.glob("trial-*"))
    assert len(trials) == 2 and all(list(t.glob("checkpoint_*")) for t in trials)
    assert all(_steps(t) == [2, 4] for t in trials)


def test_a_trial_of_two_processes_runs_under_ray_train(ray_2cpus, tmp_path):
    """parallel.data=2: each trial is a Ray Train run of 2 data-parallel processes."""
    base = load_config(None, [*TINY, "parallel.data=2", "train.batch_size=1",
                              f"output_dir={tmp_path / 'search'}"])  # fmt: skip
    search = {**SEARCH, "space": {"train.lr": {"grid": [1.0e-3]}}}
    results = run_search(base, parse_search(search, base), progress=False)
    (row,) = results.rows
    assert row["status"] == "done" and row["step"] == 4 and 0 <= row["dice_mean"] <= 1
    (trial,) = (tmp_path / "search").glob("trial-*")
    assert _steps(trial) == [2, 4]


def test_crashed_trial_is_retried_from_its_checkpoint(ray_2cpus, tmp_path):
    marker = tmp_path / "crashed"

    def crash_once(values, setup):
        # The 3e-3 trial's first attempt trains to its first checkpoint (step 2), then dies.
        if values["train.lr"] == 3e-3 and not marker.exists():
            marker.touch()
            train = {**setup.base["train"], "steps": 2}
            tune_trial(values, dataclasses.replace(setup, base={**setup.base, "train": train}))
            raise RuntimeError("trial crashed")
        tune_trial(values, setup)

    base = load_config(None, [*TINY, f"output_dir={tmp_path / 'search'}"])
    search = parse_search({**SEARCH, "max_failures": 1}, base)
    results = run_search(base, search, progress=False, trial=crash_once)
    assert marker.exists()
    assert [r["status"] for r in results.rows] == ["done", "done"]
    crashed = next(r["trial"] for r in results.rows if r["train.lr"] == 3e-3)
    # Resumed at step 2: step 2 is not trained (or reported) a second time.
    assert _steps(tmp_path / "search" / f"trial-{crashed}") == [2, 4]


def test_trials_scratch_is_removed_when_the_search_ends(ray_2cpus, tmp_path):
    record = tmp_path / "scratch.txt"

    def killed_before_cleanup(values, setup):
        # What a trial that ASHA stops leaves: its run folder, never cleaned up by the trial.
        scratch = Path(tempfile.gettempdir()) / setup.scratch
        (scratch / f"haloseg-trial-{values['train.lr']}").mkdir(parents=True)
        record.write_text(str(scratch))
        tune_trial(values, setup)

    base = load_config(None, [*TINY, f"output_dir={tmp_path / 'search'}"])
    search = {**SEARCH, "space": {"train.lr": {"grid": [1.0e-3]}}}
    results = run_search(base, parse_search(search, base), progress=False,
                         trial=killed_before_cleanup)  # fmt: skip
    assert [r["status"] for r in results.rows] == ["done"]
    scratch = Path(record.read_text())
    assert scratch.name.startswith("haloseg-tune-") and not scratch.exists()


def _finished(folder: Path) -> list[str]:
    """Trials the experiment's saved state records as finished."""
    states = list(folder.glob("experiment_state-*.json"))
    if not states:
        return []
    try:
        trials = json.loads(states[0].read_text())["trial_data"]
    except (ValueError, KeyError):
        return []  # caught mid-write
    return [t["trial_id"] for t, _ in map(lambda d: (json.loads(d[0]), d[1]), trials)
            if t["status"] == "TERMINATED"]  # fmt: skip


def test_killed_search_resumes_without_rerunning_finished_trials(ray_2cpus, tmp_path):
    folder = tmp_path / "search"
    config = tmp_path / "base.yaml"
    config.write_text("name: killed\n")
    search = tmp_path / "search.yaml"
    # 2 CPUs per trial on 2 CPUs: one trial at a time.
    search.write_text(json.dumps({**SEARCH, "resources": {"cpus": 2}}))
    args = ["tune", str(config), *TINY, f"output_dir={folder}", "--search", str(search)]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0", "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "haloseg", *args, "--no-progress", "--cpus",
                             "2"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not _finished(folder) and proc.poll() is None:
            assert time.monotonic() < deadline, "no trial finished"
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = _finished(folder)
    assert len(finished) == 1, (finished, (tmp_path / "first.log").read_text()[-3000:])
    (done,) = finished
    record = (folder / f"trial-{done}" / "result.json").read_bytes()
    assert not (folder / "results.csv").exists()

    assert main([*args, "--resume", "--no-progress"]) == 0
    rows = _rows(folder)
    assert [r["status"] for r in rows] == ["done", "done"]
    assert (folder / f"trial-{done}" / "result.json").read_bytes() == record

    # Resuming with another search, or where there is none, is refused in one line.
    other = tmp_path / "other.yaml"
    other.write_text(json.dumps({**SEARCH, "seed": 7, "resources": {"cpus": 2}}))
    changed = ["tune", str(config), *TINY, f"output_dir={folder}", "--search", str(other)]
    assert main([*changed, "--resume", "--no-progress"]) == 2
    empty = [*args[:-2], f"output_dir={tmp_path / 'none'}", *args[-2:]]
    assert main([*empty, "--resume", "--no-progress"]) == 2


def test_asha_runs_to_the_most_steps_a_trial_draws():
    from haloseg.tune.run import max_steps

    base = load_config(None, TINY)
    spec = parse_search({**SEARCH, "space": {"train.steps": {"grid": [2, 6]}}}, base)
    assert max_steps(spec, base) == 6
    assert max_steps(parse_search(SEARCH, base), base) == 4


def test_asha_compares_trials_at_the_same_step():
    from haloseg.tune.run import _scheduler

    base = load_config(None, [*TINY, "train.steps=100", "train.val_every=10"])
    search = parse_search({"space": {"train.lr": 1e-3}, "asha": {"reduction_factor": 3}}, base)
    asha = _scheduler(search, base)
    assert (asha._time_attr, asha._max_t, asha._reduction_factor) == ("step", 100, 3)
