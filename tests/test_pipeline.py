"""Pipeline stages: a U-Net cut into stages whose skips cross stage boundaries, trained by
GPipe and 1F1B schedules alone and with a spatial grid and data replicas, equals one process
accumulating the gradients of the same micro-batches (losses, gradients, BatchNorm running
statistics, forward output, gathered weights); ``haloseg train`` over stages equals one
process and is served by ``haloseg infer``; and every refusal is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from _pipeline_workers import PipeCase, pipeline_worker, reference_loss, tiny_unet
from haloseg.cli.main import main
from haloseg.config import load_config
from haloseg.errors import ConfigError, DecompositionError
from haloseg.inference.run import load_model
from haloseg.parallel.spawn import run_distributed
from haloseg.pipeline import Block, SkipSequence, unet_blocks
from haloseg.pipeline.loss import pack_target
from haloseg.pipeline.mesh import pipeline_layout
from haloseg.pipeline.runner import Pipeline
from haloseg.pipeline.stage import Stage, as_blocks, check_balance, stage_cuts
from haloseg.training.checkpoint import load_checkpoint

TOLERANCE = 1e-10


def _case(stages: int, schedule: str, *, slow: bool = False, **kw: object) -> object:
    case = PipeCase(stages, schedule, **kw)  # type: ignore[arg-type]
    return pytest.param(case, id=str(case), marks=[pytest.mark.slow] if slow else [])


CASES = [
    _case(2, "gpipe"),
    _case(3, "1f1b"),
    _case(2, "gpipe", grid=(1, 2)),
    _case(2, "1f1b", slow=True),
    _case(3, "gpipe", slow=True),
    _case(4, "gpipe", slow=True),
    _case(4, "1f1b", slow=True),
    _case(2, "1f1b", grid=(1, 2), slow=True),
    _case(3, "gpipe", grid=(1, 2), slow=True),
    _case(3, "1f1b", grid=(1, 2), slow=True),
    _case(4, "gpipe", grid=(1, 2), slow=True),
    _case(4, "1f1b", grid=(1, 2), slow=True),
    _case(2, "1f1b", data=2, slow=True),
    _case(2, "gpipe", grid=(1, 2), data=2, slow=True),
    _case(3, "1f1b", norm="instance", slow=True),
]


@pytest.mark.parametrize("case", CASES)
def test_pipeline_equals_gradient_accumulation(case: PipeCase) -> None:
    results = run_distributed(pipeline_worker, case.world, case, timeout=600)
    assert sum("forward" in r for r in results) == case.world // case.stages  # last stages
    for rank, errors in enumerate(results):
        assert errors["checked"] > 0, rank
        for key, value in errors.items():
            if key != "checked":
                assert value < TOLERANCE, (rank, key, value)


# --- stages in one process ----------------------------------------------------------------


def test_stages_chained_equal_the_network_and_hand_skips_on_unchanged() -> None:
    torch.manual_seed(0)
    net = tiny_unet()
    seq = unet_blocks(net)
    assert len(seq) == 15
    x = torch.randn(2, 2, 16, 16, dtype=torch.float64)
    want = net(x)
    cuts = stage_cuts([5, 5, 5])
    stages = [Stage(seq, a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    # skip0 (saved by block 1, taken by block 12) passes through the middle stage.
    assert stages[1].inputs == ("skip0", "skip1") and stages[1].outputs == ("skip0",)
    first = stages[0](x)
    middle = stages[1](*first)
    assert middle[1] is first[1]
    torch.testing.assert_close(stages[2](*middle), want, rtol=0, atol=0)
    mine = {id(p) for p in stages[1].parameters()}
    assert mine == {id(p) for b in seq.specs[5:10] for p in b.module.parameters()}


def test_stage_boundaries_leave_in_the_standard_layout() -> None:
    torch.manual_seed(0)
    net = tiny_unet().to(memory_format=torch.channels_last)
    seq = unet_blocks(net)
    stage = Stage(seq, 0, 7, memory_format=torch.channels_last)
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    for t in stage(x):
        assert t.stride() == torch.empty(t.shape).stride()


def _one_stage() -> str:
    """A pipeline of one stage (the micro-batched baseline of a benchmark) on one process;
    the refusal of a batch it cannot split."""
    torch.manual_seed(0)
    net = tiny_unet()
    ref = tiny_unet()
    ref.load_state_dict(net.state_dict())
    x = torch.randn(4, 2, 16, 16, dtype=torch.float64)
    target = pack_target(torch.randint(0, 3, (4, 16, 16)))
    pipe = Pipeline(net, pipeline_layout(1), microbatches=4, schedule="gpipe")
    loss = pipe.step(x, target)
    want = 0.0
    for xm, tm in zip(x.chunk(4), target.chunk(4), strict=True):
        part = reference_loss(ref(xm), tm) / 4
        part.backward()
        want += part.item()
    assert loss == pytest.approx(want, rel=TOLERANCE)
    grads = dict(ref.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=TOLERANCE, atol=0)
    try:
        pipe.step(x[:3], target[:3])
    except ConfigError as e:
        return str(e)
    return "accepted"


def test_one_stage_runs_micro_batches_and_refuses_a_batch_it_cannot_split() -> None:
    (refusal,) = run_distributed(_one_stage, 1, timeout=300)
    assert refusal.startswith("a batch of 3 images and 3 targets does not split into "
                              "microbatches=4; give the same multiple of 4")  # fmt: skip


def _refusals() -> list[str]:
    """What each stage says of a network it cannot cut and of an image it cannot run; each
    refusal leaves the processes free for the next (no message was sent)."""
    said = []
    one_block = SkipSequence([Block("conv", nn.Conv2d(2, 3, 3, padding=1).double())])
    example = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    for balance in (None, [1, 1]):
        try:
            Pipeline(one_block, pipeline_layout(2), microbatches=2, balance=balance,
                     example=example)  # fmt: skip
        except ConfigError as e:
            said.append(str(e))
    pipe = Pipeline(tiny_unet(), pipeline_layout(2), microbatches=2, schedule="gpipe",
                    balance=[8, 7])  # fmt: skip
    x = torch.randn(2, 2, 16, 18, dtype=torch.float64)
    try:
        pipe.step(x, pack_target(torch.zeros(2, 16, 18, dtype=torch.int64)))
    except DecompositionError as e:
        said.append(str(e))
    return said


def test_what_a_pipeline_cannot_run_is_refused_on_every_stage() -> None:
    stages = "parallel.pipeline=2 stages but the network has only 1 blocks; use at most 1 stages"
    # The last stage never sees the image, yet refuses it too: before any message is sent.
    image = "image size 18 along dimension 1 is not a multiple of the network's down-sampling"
    for said in run_distributed(_refusals, 2, timeout=120):
        assert len(said) == 3 and said[0] == said[1] == stages, said
        assert said[2].startswith(image), said


def test_networks_and_balances_that_cannot_be_cut_are_refused() -> None:
    refusal = "Sequential is not a SkipSequence, so it cannot be cut into pipeline stages"
    with pytest.raises(ConfigError, match=f"{refusal}; use haloseg's U-Net"):
        as_blocks(nn.Sequential(nn.Conv2d(1, 1, 3)))
    with pytest.raises(ConfigError, match="parallel.pipeline=16 stages but the network has "
                                          "only 15 blocks; use at most 15 stages"):  # fmt: skip
        check_balance([1] * 16, 16, 15)
    with pytest.raises(ConfigError, match=r"parallel.balance=\[7, 7\] must give .* 15 in all"):
        check_balance([7, 7], 2, 15)


# --- configs refused --------------------------------------------------------------------------


class TwoConvs(SkipSequence):
    """A network written as blocks: a pipeline can cut it."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 3):
        super().__init__([Block("a", nn.Conv2d(in_channels, 4, 3, padding=1), saves="s"),
                          Block("b", _Add(4, out_channels), takes=("s",))])  # fmt: skip


class _Add(nn.Module):
    def __init__(self, c: int, out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, out, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(x + skip)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["parallel.pipeline=2", "parallel.microbatches=3", "train.batch_size=4"],
      "parallel.microbatches=3 does not divide train.batch_size=4"),
     (["parallel.pipeline=3", "parallel.microbatches=2", "train.batch_size=2"],
      "parallel.schedule=1f1b needs at least as many micro-batches as the parallel.pipeline=3 "
      "stages, but parallel.microbatches=2 gives 2"),
     (["parallel.pipeline=2"], "but train.batch_size=1 (one image per micro-batch) gives 1"),
     (["parallel.microbatches=2", "train.batch_size=2"],
      "parallel.microbatches=2 splits the batches of a pipeline, but parallel.pipeline=1"),
     (["parallel.pipeline=2", "parallel.schedule=gpipe", "memory.checkpoint=true"],
      "memory.checkpoint=true recomputes whole U-Net levels, which parallel.pipeline=2 cuts"),
     (["parallel.pipeline=2", "parallel.schedule=gpipe", "memory.swap=all"],
      "memory.swap=all does not run inside a pipeline's schedule"),
     (["parallel.pipeline=2", "parallel.schedule=gpipe",
       "model.target=monai.networks.nets.SegResNet"],
      "model.target=monai.networks.nets.SegResNet is not a haloseg.pipeline.SkipSequence, so "
      "parallel.pipeline=2 cannot cut it into stages; use a model.preset")],
)  # fmt: skip
def test_config_refuses_what_a_pipeline_cannot_run(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_config_takes_a_skip_sequence_target() -> None:
    cfg = load_config(None, ["parallel.pipeline=2", "parallel.schedule=gpipe",
                             f"model.target={__name__}.TwoConvs"])  # fmt: skip
    assert len(as_blocks(TwoConvs())) == 2 and cfg.parallel.pipeline == 2


def test_train_refuses_a_launch_of_the_wrong_size(tmp_path: Path, capsys) -> None:
    (tmp_path / "c.yaml").write_text("name: tiny\n")
    argv = ["train", str(tmp_path / "c.yaml"), f"output_dir={tmp_path / 'run'}", *TINY,
            "parallel.pipeline=2", "parallel.microbatches=2", "train.batch_size=2",
            "parallel.grid=[1, 2]", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("haloseg: error: parallel.pipeline=2 x parallel.data=1 x grid [1, 2]")
    assert "= 4 processes, but 1 were launched; launch with torchrun --nproc-per-node=4" in line
    assert not (tmp_path / "run").exists()


# --- haloseg train over stages -----------------------------------------------------------------

TINY = [
    "data.shape=[32, 32]", "data.num_images=6", "model.depth=2", "model.base_channels=4",
    "device=cpu", "train.dtype=float64", "train.val_every=2", "train.schedule=constant",
    "train.warmup_steps=0",
]  # fmt: skip
STAGES = ["parallel.pipeline=2", "parallel.microbatches=2", "train.batch_size=2"]


def _train(folder: Path, run: str, world: int, *overrides: str) -> Path:
    config = folder / "tiny.yaml"
    config.write_text("name: tiny\n")
    argv = ["train", str(config), f"output_dir={folder / run}", *TINY, *overrides]
    codes = run_distributed(main, world, [*argv, "--no-progress"], timeout=600)
    assert codes == [0] * world
    return folder / run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four steps over 2 stages x 2 micro-batches, and on one process accumulating the same
    micro-batches (one image each)."""
    root = tmp_path_factory.mktemp("pipeline")
    return {
        "stages": _train(root, "stages", 2, *STAGES, "train.steps=4"),
        "one": _train(root, "one", 1, "train.batch_size=1", "train.accumulate=2",
                      "train.steps=4"),
    }  # fmt: skip


def _assert_same_run(got_run: Path, want_run: Path) -> None:
    got, want = load_checkpoint(got_run / "checkpoints"), load_checkpoint(want_run / "checkpoints")
    assert [h["step"] for h in got["history"]] == [h["step"] for h in want["history"]]
    for a, b in zip(got["history"], want["history"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=TOLERANCE, abs=1e-12), key
    assert got["model"].keys() == want["model"].keys()
    for key, value in want["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=TOLERANCE, atol=1e-12, msg=key)
    for i, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(got["optimizer"]["state"][i][key], value,
                                       rtol=TOLERANCE, atol=1e-12)  # fmt: skip


def test_train_over_two_stages_equals_one_process(runs: dict[str, Path]) -> None:
    _assert_same_run(runs["stages"], runs["one"])
    assert (runs["stages"] / "overlays.png").is_file()
    assert json.loads((runs["stages"] / "metrics.json").read_text())["processes"] == 2


def test_infer_serves_the_pipelined_run(runs: dict[str, Path], tmp_path: Path) -> None:
    image = np.random.default_rng(1).normal(size=(1, 32, 32)).astype(np.float32)
    np.save(tmp_path / "image.npy", image)
    out = tmp_path / "labels.npy"
    argv = ["infer", "--checkpoint", str(runs["stages"]), "--input", str(tmp_path / "image.npy"),
            "--output", str(out), "--tile", "16", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    model, _ = load_model(runs["stages"])
    x = torch.from_numpy(image.astype(np.float64))
    x = ((x - x.mean()) / x.std(unbiased=False)).to(next(model.parameters()).dtype)
    with torch.no_grad():
        want = model(x[None]).argmax(1)[0].numpy()
    np.testing.assert_array_equal(np.load(out), want)


@pytest.mark.slow
def test_a_pipelined_run_resumes_to_the_uninterrupted_weights(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    _train(tmp_path, "resumed", 2, *STAGES, "train.steps=2")
    config = tmp_path / "tiny.yaml"
    argv = ["train", str(config), f"output_dir={tmp_path / 'resumed'}", *TINY, *STAGES,
            "train.steps=4", "--resume", "--no-progress"]  # fmt: skip
    assert run_distributed(main, 2, argv, timeout=600) == [0, 0]
    _assert_same_run(tmp_path / "resumed", runs["one"])


@pytest.mark.slow
def test_train_over_stages_of_a_grid_equals_one_process(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    run = _train(tmp_path, "grid", 4, *STAGES, "train.steps=4", "parallel.grid=[1, 2]")
    _assert_same_run(run, runs["one"])
