"""Workers for the pipeline tests (importable by spawned processes): a tiny U-Net trained
through pipeline stages against one process accumulating the same micro-batches."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from haloseg.models import unet_preset
from haloseg.pipeline.balance import even_split
from haloseg.pipeline.loss import pack_target
from haloseg.pipeline.mesh import pipeline_layout
from haloseg.pipeline.runner import Pipeline
from haloseg.pipeline.stage import as_blocks
from haloseg.pipeline.state import gather_stages

CHANNELS, CLASSES = 2, 3


@dataclass(frozen=True)
class PipeCase:
    """Stages x data replicas x a spatial grid, trained ``steps`` SGD steps."""

    stages: int
    schedule: str
    grid: tuple[int, int] = (1, 1)
    data: int = 1
    microbatches: int = 4
    batch: int = 4
    """Images per replica per step."""
    shape: tuple[int, int] = (16, 16)
    balance: tuple[int, ...] | None = None
    norm: str = "batch"
    steps: int = 2

    @property
    def world(self) -> int:
        return self.stages * self.data * math.prod(self.grid)

    def __str__(self) -> str:
        grid = "" if self.grid == (1, 1) else f"-grid{self.grid[0]}x{self.grid[1]}"
        data = "" if self.data == 1 else f"-data{self.data}"
        return f"{self.stages}stages-{self.schedule}{grid}{data}-{self.norm}"


def tiny_unet(norm: str = "batch") -> torch.nn.Module:
    return unet_preset("small", spatial_dims=2, in_channels=CHANNELS, out_channels=CLASSES,
                       depth=2, base_channels=4, norm=norm).double()  # fmt: skip


def _batches(case: PipeCase) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every replica's images and packed targets of each step (the same on every rank)."""
    g = torch.Generator().manual_seed(1)
    n = case.batch * case.data
    out = []
    for _ in range(case.steps):
        x = torch.randn(n, CHANNELS, *case.shape, generator=g, dtype=torch.float64)
        label = torch.randint(0, CLASSES, (n, *case.shape), generator=g)
        valid = torch.rand(n, *case.shape, generator=g) > 0.2
        out.append((x, pack_target(label, valid)))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / max(b.double().norm().item(), 1e-30)).item()


def reference_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the valid voxels plus soft Dice per (sample, class), written out
    in plain PyTorch for one process."""
    valid = target >= 0
    label = target.clamp(min=0)
    ce = F.cross_entropy(logits, label.masked_fill(~valid, -100))
    probs = logits.softmax(1) * valid[:, None]
    onehot = F.one_hot(label, logits.shape[1]).movedim(-1, 1).double() * valid[:, None]
    inter, p, t = ((probs * onehot).sum((2, 3)), probs.sum((2, 3)), onehot.sum((2, 3)))
    return ce + 1 - ((2 * inter + 1e-5) / (p + t + 1e-5)).mean()


def _reference_step(
    ref: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, case: PipeCase
) -> list[float]:
    """One process: micro-batch ``m`` of every replica in one forward (BatchNorm's batch),
    each replica's loss of it divided by data x micro-batches, gradients accumulated."""
    per = case.batch // case.microbatches
    losses = [0.0] * case.data
    for m in range(case.microbatches):
        rows = [r * case.batch + m * per + i for r in range(case.data) for i in range(per)]
        logits = ref(x[rows])
        total = 0
        for r in range(case.data):
            part = slice(r * per, (r + 1) * per)
            loss = reference_loss(logits[part], target[rows][part]) / case.microbatches
            losses[r] += loss.item()
            total = total + loss / case.data
        total.backward()
    return losses


def pipeline_worker(case: PipeCase) -> dict[str, float]:
    """Relative differences between the pipeline and one process: losses, this stage's
    gradients and BatchNorm statistics after each step, the forward-only output, and every
    weight after the stages are gathered."""
    torch.manual_seed(0)
    net = tiny_unet(case.norm)
    ref = copy.deepcopy(net)
    batches = _batches(case)
    layout = pipeline_layout(case.stages, data=case.data, grid=case.grid)
    blocks = len(as_blocks(net))
    balance = list(case.balance or even_split(blocks, case.stages))
    pipe = Pipeline(net, layout, microbatches=case.microbatches, schedule=case.schedule,
                    balance=balance)  # fmt: skip
    dec, r = layout.dec, layout.data_rank
    names = {id(p): n for n, p in net.named_parameters()}
    staged = {id(q) for q in pipe.stage.parameters()}
    mine = [n for n, p in net.named_parameters() if id(p) in staged]
    ref_params = dict(ref.named_parameters())
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (net, ref))
    errors = {"loss": 0.0, "grad": 0.0, "stats": 0.0, "checked": 0.0}
    for x, target in batches:
        ref_losses = _reference_step(ref, x, target, case)
        part = slice(r * case.batch, (r + 1) * case.batch)
        x_local = dec.scatter(x[part])
        t_local = dec.scatter(target[part, None])[:, 0]
        loss = pipe.step(x_local, t_local)
        if layout.is_last:
            errors["loss"] = max(errors["loss"], abs(loss - ref_losses[r]) / abs(ref_losses[r]))
        for p in pipe.stage.parameters():
            errors["grad"] = max(errors["grad"], _rel(p.grad, ref_params[names[id(p)]].grad))
            errors["checked"] += 1
        others = [n for n, p in net.named_parameters() if n not in mine and p.grad is not None]
        assert not others, f"stage {layout.stage} has gradients of other stages: {others}"
        ref_buffers = dict(ref.named_buffers())
        for name, b in net.named_buffers():
            if any(b is q for q in pipe.stage.buffers()):
                errors["stats"] = max(errors["stats"], _rel(b, ref_buffers[name]))
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    net.eval(), ref.eval()
    x, _ = batches[0]
    out = pipe.forward(dec.scatter(x[r * case.batch : (r + 1) * case.batch]))
    with torch.no_grad():
        want = ref(x[r * case.batch : (r + 1) * case.batch])
    if layout.is_last:
        errors["forward"] = _rel(out, dec.scatter(want))
    gather_stages(pipe)
    ref_state = ref.state_dict()
    errors["gathered"] = max(_rel(v, ref_state[k]) for k, v in net.state_dict().items())
    return errors
