"""Module-to-module KD (m2mKD, Lo et al. 2024): phase 1 trains each student stage on its own, placed into
the frozen teacher in place of the teacher's matching stage, to reproduce that stage's output and the
teacher's final logits (plus the task's loss); phase 2 (the ordinary distill loop) trains the assembled student.
Probes, the task term and the logit KD follow the data's task (images, or token windows: KD token by token).

Stages (`kd.m2m.student_stages`, `kd.m2m.teacher_stages`) are by default `all` of each model's feature layers:
a CNN's stages, a transformer's blocks (blocks.0 .. blocks.{n-1}). Explicit paths pair one to one. With both
`all`, a teacher with k times the student's count (m2mKD's setting: fewer, smaller modules) is split into groups
of k consecutive blocks: student stage i stands in for teacher blocks [i*k, (i+1)*k) (the group's other blocks
are identities in that hybrid) and learns the output of the group's last block. Counts that do not divide are
bad input; a group must be consecutive entries of one module list, as a transformer's blocks are.

Where a student stage's input or output shape differs from the teacher stage's (a narrower student), small
trainable adapters bridge it in phase 1 (1x1 convolution + batch norm for feature maps, as the feature methods'
connectors; a linear map over the last dimension for (B, T, D) tokens or vectors): teacher features -> student
stage -> teacher shape. They are discarded after phase 1; drop-in stages get none.

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

from modrun.components.data.base import Data, example_input
from modrun.components.data.tasks import Task
from modrun.core.checkpoint import seed_everything
from modrun.core.errors import UserError
from modrun.engine.loop import Objective, fit
from modrun.engine.phases import done_path, run_phase
from modrun.methods.distill.capture import Capture, resolve_layers
from modrun.methods.distill.methods_logit import soft_kl

log = logging.getLogger("modrun")


class Hybrid(nn.Module):
    """A frozen copy of the teacher in which the (trainable) student stage replaces the first module of the
    group `paths` and the group's other modules become identities."""

    def __init__(self, teacher: nn.Module, paths: list[str], stage: nn.Module) -> None:
        super().__init__()
        self.net = copy.deepcopy(teacher).requires_grad_(False)
        self.net.set_submodule(paths[0], stage)
        for path in paths[1:]:
            self.net.set_submodule(path, nn.Identity())
        self.stage = stage  # the same module object: training it trains the student

    def train(self, mode: bool = True) -> Hybrid:
        super().train(False)  # the teacher's parts stay in eval mode (batch-norm statistics frozen)
        self.stage.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _items(logits: torch.Tensor) -> torch.Tensor:
    """(items, classes): an image is one item, each token of a (B, T, vocab) window one (token-level KD)."""
    return logits.reshape(-1, logits.shape[-1])


class StageObjective(Objective):
    """Match the teacher stage's output (MSE) and the teacher's logits (KD) through the hybrid, plus the task."""

    def __init__(
        self, hybrid: Hybrid, teacher: nn.Module, target: str, m2m: DictConfig, task_weight: float, task: Task
    ) -> None:
        super().__init__(hybrid)
        self.teacher, self.m2m, self.task_weight, self.task = teacher, m2m, task_weight, task
        self.t_capture = Capture(teacher, [target])  # a group's target: the output of its last teacher stage
        self._stage_out: torch.Tensor | None = None
        self._hook = hybrid.stage.register_forward_hook(lambda m, i, o: setattr(self, "_stage_out", o))

    def close(self) -> None:
        """Remove the hooks: the stage and the teacher live on into phase 2."""
        self._hook.remove()
        self.t_capture.remove()

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's logits and its stage (group) output for x."""
        with torch.no_grad():
            t_logits = self.teacher(x)
            return t_logits, next(iter(self.t_capture.take().values()))

    def loss(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        t_logits, t_stage = self.targets(x)
        logits = self.model(x)
        stage_loss = F.mse_loss(self._stage_out, t_stage)
        logit_loss = soft_kl(_items(logits), _items(t_logits), float(self.m2m.temperature))
        task = self.task.loss(logits, y)
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
    # (D,) vectors or (T, D) tokens (a batch is (B, T, D)): nn.Linear maps the last dimension token by token;
    # the token count is the same on both sides (checked by stage_problems)
    return nn.Linear(src[-1], dst[-1])


class Bridged(nn.Module):
    """A student stage between adapters, so it takes the teacher's features and gives the teacher's shape."""

    def __init__(self, stage: nn.Module, into: nn.Module, out: nn.Module) -> None:
        super().__init__()
        self.into, self.stage, self.out = into, stage, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.stage(self.into(x)))


Shapes = tuple[torch.Size, torch.Size]  # a stage's (input, output) shape per sample


def bridge(stage: nn.Module, student: Shapes, teacher: Shapes) -> nn.Module:
    """`stage` itself for a drop-in pair, else the stage wrapped in adapters (teacher in -> student in, out -> out)."""
    if student == teacher:
        return stage
    return Bridged(stage, adapter(teacher[0], student[0]), adapter(student[1], teacher[1]))


def pair_stages(student: nn.Module, teacher: nn.Module, m2m: DictConfig) -> tuple[list[str], list[list[str]]]:
    """The student's stage paths and, for each, the group of teacher stages it stands in for (see the module
    docstring: one to one, or consecutive groups when both sides are `all` and the counts divide)."""
    s_paths = resolve_layers(student, m2m.student_stages, "kd.m2m.student_stages")
    t_paths = resolve_layers(teacher, m2m.teacher_stages, "kd.m2m.teacher_stages")
    n, m = len(s_paths), len(t_paths)
    if n == m:
        return s_paths, [[p] for p in t_paths]
    whole = m2m.student_stages == "all" and m2m.teacher_stages == "all"
    if not whole or n == 0 or m % n:
        grouped = f", or a multiple of {n} (groups of consecutive blocks)" if whole and n else ""
        raise UserError(
            f"kd.m2m: {n} student stages but {m} teacher stages; kd.m2m.teacher_stages must give as many{grouped}"
        )
    k = m // n
    groups = [t_paths[i * k : (i + 1) * k] for i in range(n)]
    for group in groups:
        if not _consecutive(group):
            raise UserError(
                f"kd.m2m.teacher_stages=all: {m} teacher stages grouped by {k} for the student's {n}, but "
                f"{', '.join(group)} are not consecutive entries of one module list (as a transformer's blocks)"
            )
    return s_paths, groups


def _consecutive(paths: list[str]) -> bool:
    """paths are <parent>.i, <parent>.i+1, ...: successive entries of one list, nothing run between them."""
    parts = [p.rpartition(".") for p in paths]
    if len({parent for parent, _, _ in parts}) != 1 or not all(i.isdigit() for _, _, i in parts):
        return False
    idx = [int(i) for _, _, i in parts]
    return idx == list(range(idx[0], idx[0] + len(idx)))


def stage_shapes(model: nn.Module, groups: list[list[str]], x: torch.Tensor) -> list[Shapes]:
    """(input shape of a group's first module, output shape of its last) of each group for the input x."""
    seen: dict[str, Shapes] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[p].register_forward_hook(lambda m, i, o, p=p: seen.__setitem__(p, (i[0].shape[1:], o.shape[1:])))
        for p in {p for g in groups for p in g}
    ]
    with torch.no_grad():
        was = model.training
        model.eval()
        model(x)
        model.train(was)
    for h in hooks:
        h.remove()
    return [(seen[g[0]][0], seen[g[-1]][1]) for g in groups]


def stage_pairs(
    student: nn.Module, teacher: nn.Module, s_paths: list[str], t_groups: list[list[str]], probe: torch.Tensor
) -> list[tuple[Shapes, Shapes]]:
    """(student shapes, teacher shapes) of each stage pair for the input `probe`."""
    s_shapes, t_shapes = stage_shapes(student, [[p] for p in s_paths], probe), stage_shapes(teacher, t_groups, probe)
    return list(zip(s_shapes, t_shapes, strict=True))


def stage_problems(s_paths: list[str], t_groups: list[list[str]], pairs: list[tuple[Shapes, Shapes]]) -> list[str]:
    """Paired stages need features an adapter can bridge (same rank; for tokens, the same token count)."""
    return [
        f"kd.m2m: stage {i} ({s_paths[i]} / {'+'.join(t_groups[i])}) shapes cannot be bridged: student in/out "
        f"{tuple(map(tuple, s))}, teacher {tuple(map(tuple, t))}; adapters need the same rank (and token count)"
        for i, (s, t) in enumerate(pairs)
        if not all(_bridgeable(a, b) for a, b in zip(s, t, strict=True))
    ]


def _bridgeable(a: torch.Size, b: torch.Size) -> bool:
    return len(a) == len(b) and (len(a) in (1, 3) or a[:-1] == b[:-1])


def m2m_problems(cfg: DictConfig, student: nn.Module, teacher: nn.Module) -> list[str]:
    """The stages checked before any work, on models built on the meta device (no memory, no time)."""
    try:
        s_paths, t_groups = pair_stages(student, teacher, cfg.kd.m2m)
    except UserError as e:
        return e.messages
    d = cfg.data
    sizes = [int(d.get(k) or 0) for k in ("channels", "image_size", "block_size")]
    probe = example_input(str(d.get("task")), 2, "meta", *sizes)
    return stage_problems(s_paths, t_groups, stage_pairs(student, teacher, s_paths, t_groups, probe))


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
    s_paths, t_groups = pair_stages(student, teacher, m2m)
    shapes = stage_pairs(student, teacher, s_paths, t_groups, data.example(2, device))  # images or token windows
    problems = stage_problems(s_paths, t_groups, shapes)
    if problems:
        raise UserError(*problems)
    copied = _copy_matching(teacher, student, s_paths)
    log.info(f"m2m: {len(s_paths)} stages; copied from the teacher where shapes match: {', '.join(copied) or 'none'}")
    phase_cfg = OmegaConf.merge(cfg, {"trainer": {"epochs": int(m2m.epochs)}})
    results = {}
    modules = dict(student.named_modules())
    for i, (s_path, group) in enumerate(zip(s_paths, t_groups, strict=True)):
        phase = f"m2m_stage{i}"
        seed_everything(int(cfg.seed) + 1 + i)  # each phase starts from its own seed (adapters too), resumed or not
        stage = bridge(modules[s_path], *shapes[i]).to(device)
        hybrid = Hybrid(teacher, group, stage)
        bridged = (
            f" (adapters: {_shape(shapes[i][1][0])} -> {_shape(shapes[i][0][0])} in, "
            f"{_shape(shapes[i][0][1])} -> {_shape(shapes[i][1][1])} out)"
            if stage is not modules[s_path]
            else ""
        )
        if not done_path(run_dir, phase).exists():
            where = f"in place of {'+'.join(group)}{bridged}"
            log.info(f"m2m phase 1, stage {i}: student {s_path} inside the teacher {where}")

        def train(hybrid: Hybrid = hybrid, target: str = group[-1], phase: str = phase) -> dict:
            objective = StageObjective(hybrid, teacher, target, m2m, float(cfg.kd.task_weight), data.task)
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
    """Start the student's non-stage modules (stem, embeddings, final norm, head) from the teacher's where
    every tensor of the module matches by name and shape (never a head's bias without its weight). A tied
    head (gpt's TiedHead) holds no parameter: it follows the copied embedding; an untied student head still
    finds a tied teacher's matrix under the head's own name."""
    t_state, copied = {**teacher.state_dict(), **_tied(teacher)}, []
    owners: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in student.state_dict().items():
        if not any(name.startswith(p + ".") for p in stage_paths):
            owners.setdefault(name.rpartition(".")[0] or name, {})[name] = value  # root tensors: each its own
    with torch.no_grad():
        for tensors in owners.values():
            if all(k in t_state and t_state[k].shape == v.shape for k, v in tensors.items()):
                for k, v in tensors.items():
                    v.copy_(t_state[k])
                copied += [k.split(".")[0] for k in tensors]
    return sorted(set(copied))


def _tied(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights that modules expose without registering them (a head tied to the embedding), by module path."""
    state = model.state_dict()
    weights = {f"{name}.weight": getattr(m, "weight", None) for name, m in model.named_modules() if name}
    return {k: w for k, w in weights.items() if isinstance(w, torch.Tensor) and k not in state}
