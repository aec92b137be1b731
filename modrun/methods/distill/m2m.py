"""Module-to-module KD (m2mKD, Lo et al. 2024): phase 1 trains each student stage on its own, placed into
the frozen teacher in place of the teacher's matching stage, to reproduce that stage's output and the
teacher's final logits; phase 2 (the ordinary distill loop) then trains the assembled student.

Where a student stage's input or output shape differs from the teacher stage's (a narrower student), small
trainable adapters bridge it in phase 1 (1x1 convolution + batch norm for feature maps, as the feature methods'
connectors; a linear map for token or vector features): teacher features -> student stage -> teacher shape.
They are discarded after phase 1; drop-in stages get none.

Each stage is a phase of its own (`checkpoints/m2m_stage<i>/`, metrics tagged with the phase), so a killed
run resumes inside the stage it was in and skips the stages already done.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from modrun.components.data.base import Data
from modrun.core.checkpoint import seed_everything
from modrun.core.errors import UserError
from modrun.engine.loop import Objective, fit
from modrun.engine.phases import done_path, run_phase
from modrun.methods.distill.capture import Capture, resolve_layers
from modrun.methods.distill.methods_logit import soft_kl

log = logging.getLogger("modrun")


class Hybrid(nn.Module):
    """A frozen copy of the teacher whose stage at `path` is the (trainable) student stage."""

    def __init__(self, teacher: nn.Module, path: str, stage: nn.Module) -> None:
        super().__init__()
        self.net = copy.deepcopy(teacher).requires_grad_(False)
        self.net.set_submodule(path, stage)
        self.stage = stage  # the same module object: training it trains the student

    def train(self, mode: bool = True) -> Hybrid:
        super().train(False)  # the teacher's parts stay in eval mode (batch-norm statistics frozen)
        self.stage.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class StageObjective(Objective):
    """Match the teacher stage's output (MSE) and the teacher's logits (KD) through the hybrid."""

    def __init__(self, hybrid: Hybrid, teacher: nn.Module, teacher_path: str, m2m: DictConfig, task_weight: float):
        super().__init__(hybrid)
        self.teacher, self.m2m, self.task_weight = teacher, m2m, task_weight
        self.t_capture = Capture(teacher, [teacher_path])
        self._stage_out: torch.Tensor | None = None
        self._hook = hybrid.stage.register_forward_hook(lambda m, i, o: setattr(self, "_stage_out", o))

    def close(self) -> None:
        """Remove the hooks: the stage and the teacher live on into phase 2."""
        self._hook.remove()
        self.t_capture.remove()

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def loss(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        with torch.no_grad():
            t_logits = self.teacher(x)
            t_stage = next(iter(self.t_capture.take().values()))
        logits = self.model(x)
        stage_loss = F.mse_loss(self._stage_out, t_stage)
        logit_loss = soft_kl(logits, t_logits, float(self.m2m.temperature))
        task = F.cross_entropy(logits, y)
        total = self.m2m.stage_weight * stage_loss + self.m2m.logit_weight * logit_loss + self.task_weight * task
        return total, logits, {"stage_loss": stage_loss.detach(), "logit_loss": logit_loss.detach()}


def adapter(src: torch.Size, dst: torch.Size) -> nn.Module:
    """A trainable map from features of shape `src` to shape `dst` (per sample), or Identity if they agree."""
    if src == dst:
        return nn.Identity()
    if len(src) == 3:  # (C, H, W) feature maps
        layers: list[nn.Module] = [nn.Conv2d(src[0], dst[0], 1, bias=False), nn.BatchNorm2d(dst[0])]
        if src[1:] != dst[1:]:
            layers.append(nn.Upsample(size=tuple(dst[1:]), mode="bilinear", align_corners=False))
        return nn.Sequential(*layers)
    return nn.Linear(src[-1], dst[-1])  # (D,) vectors or (L, D) tokens: same count checked by stage_problems


class Bridged(nn.Module):
    """A student stage between adapters, so it takes the teacher's features and gives the teacher's shape."""

    def __init__(self, stage: nn.Module, into: nn.Module, out: nn.Module) -> None:
        super().__init__()
        self.into, self.stage, self.out = into, stage, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.stage(self.into(x)))


def bridge(stage: nn.Module, student: tuple[torch.Size, torch.Size], teacher: tuple[torch.Size, torch.Size]):  # noqa: ANN201
    """`stage` itself for a drop-in pair, else the stage wrapped in adapters (teacher in -> student in, out -> out)."""
    if student == teacher:
        return stage
    return Bridged(stage, adapter(teacher[0], student[0]), adapter(student[1], teacher[1]))


def stage_shapes(model: nn.Module, paths: list[str], x: torch.Tensor) -> list[tuple[torch.Size, torch.Size]]:
    """(input shape, output shape) of each module at `paths` for the input x."""
    seen: dict[str, tuple[torch.Size, torch.Size]] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[p].register_forward_hook(lambda m, i, o, p=p: seen.__setitem__(p, (i[0].shape[1:], o.shape[1:])))
        for p in paths
    ]
    with torch.no_grad():
        was = model.training
        model.eval()
        model(x)
        model.train(was)
    for h in hooks:
        h.remove()
    return [seen[p] for p in paths]


def stage_problems(
    student: nn.Module, teacher: nn.Module, s_paths: list[str], t_paths: list[str], probe: torch.Tensor
) -> list[str]:
    """Stages must pair up: same count, and features an adapter can bridge (same rank; same token count)."""
    if len(s_paths) != len(t_paths):
        return [f"kd.m2m: {len(s_paths)} student stages but {len(t_paths)} teacher stages"]
    pairs = zip(stage_shapes(student, s_paths, probe), stage_shapes(teacher, t_paths, probe), strict=True)
    return [
        f"kd.m2m: stage {i} ({s_paths[i]} / {t_paths[i]}) shapes cannot be bridged: student in/out "
        f"{tuple(map(tuple, s))}, teacher {tuple(map(tuple, t))}; adapters need the same rank (and token count)"
        for i, (s, t) in enumerate(pairs)
        if not all(_bridgeable(a, b) for a, b in zip(s, t, strict=True))
    ]


def _bridgeable(a: torch.Size, b: torch.Size) -> bool:
    return len(a) == len(b) and (len(a) in (1, 3) or a[:-1] == b[:-1])


def run_phase1(
    cfg: DictConfig,
    run_dir: Path,
    student: nn.Module,
    teacher: nn.Module,
    data: Data,
    device: torch.device,
    resume: bool,
) -> dict:
    """Train every student stage inside the teacher; leaves the trained stages in `student`."""
    m2m = cfg.kd.m2m
    s_paths = resolve_layers(student, m2m.student_stages, "kd.m2m.student_stages")
    t_paths = resolve_layers(teacher, m2m.teacher_stages, "kd.m2m.teacher_stages")
    probe = torch.zeros(2, data.channels, data.image_size, data.image_size, device=device)
    problems = stage_problems(student, teacher, s_paths, t_paths, probe)
    if problems:
        raise UserError(*problems)
    shapes = list(zip(stage_shapes(student, s_paths, probe), stage_shapes(teacher, t_paths, probe), strict=True))
    copied = _copy_matching(teacher, student, s_paths)
    log.info(f"m2m: {len(s_paths)} stages; copied from the teacher where shapes match: {', '.join(copied) or 'none'}")
    phase_cfg = OmegaConf.merge(cfg, {"trainer": {"epochs": int(m2m.epochs)}})
    results = {}
    modules = dict(student.named_modules())
    for i, (s_path, t_path) in enumerate(zip(s_paths, t_paths, strict=True)):
        phase = f"m2m_stage{i}"
        seed_everything(int(cfg.seed) + 1 + i)  # each phase starts from its own seed (adapters too), resumed or not
        stage = bridge(modules[s_path], *shapes[i]).to(device)
        hybrid = Hybrid(teacher, t_path, stage)
        bridged = (
            f" (adapters: {_shape(shapes[i][1][0])} -> {_shape(shapes[i][0][0])} in, "
            f"{_shape(shapes[i][0][1])} -> {_shape(shapes[i][1][1])} out)"
            if stage is not modules[s_path]
            else ""
        )
        if not done_path(run_dir, phase).exists():
            log.info(f"m2m phase 1, stage {i}: student {s_path} inside the teacher in place of {t_path}{bridged}")

        def train(hybrid: Hybrid = hybrid, t_path: str = t_path, phase: str = phase) -> dict:
            objective = StageObjective(hybrid, teacher, t_path, m2m, float(cfg.kd.task_weight))
            result = fit(phase_cfg, run_dir, objective, data, device, resume, phase=phase)
            objective.close()
            return result

        def restore(ckpt: dict, hybrid: Hybrid = hybrid) -> None:  # finished before a kill: its final weights
            hybrid.load_state_dict(ckpt["modules"]["model"])

        results[phase] = run_phase(run_dir, phase, int(cfg.seed) + 1 + i, train, restore, device)
    return results


def _shape(size: torch.Size) -> str:
    return "x".join(map(str, size))


def _copy_matching(teacher: nn.Module, student: nn.Module, stage_paths: list[str]) -> list[str]:
    """Start the student's non-stage parameters (stem, classifier) from the teacher's where shapes match."""
    t_state, copied = teacher.state_dict(), []
    with torch.no_grad():
        for name, value in student.state_dict().items():
            if any(name.startswith(p + ".") for p in stage_paths):
                continue
            if name in t_state and t_state[name].shape == value.shape:
                value.copy_(t_state[name])
                copied.append(name.split(".")[0])
    return sorted(set(copied))
