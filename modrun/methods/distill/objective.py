"""The distillation objective: task loss plus weighted KD terms over captured student and teacher outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from modrun.components.data.base import Data
from modrun.components.data.tasks import Task
from modrun.components.data.text import TextSplit
from modrun.core.errors import UserError
from modrun.core.registry import KD_METHODS
from modrun.engine.loop import Objective
from modrun.methods.distill import TERM_KEYS
from modrun.methods.distill.base import KDContext, Outputs, warmup_factor
from modrun.methods.distill.cache import TeacherCache
from modrun.methods.distill.capture import Capture, resolve_layers
from modrun.methods.distill.topk import bucket_logits, teacher_topk


@dataclass
class Term:
    key: str  # its name under kd.terms, used in logs ("kd_<key>")
    weight: float
    student_paths: list[str]
    teacher_paths: list[list[str]]  # per teacher
    warmup_epochs: float = 0.0  # the weight ramps in over these epochs (DKD, ReviewKD recipes)


def _items(logits: torch.Tensor) -> torch.Tensor:
    """(items, classes): images as they are, the tokens of (B, T, vocab) windows as B * T rows, so that logit
    methods (a mean over rows) average over tokens."""
    return logits.reshape(-1, logits.shape[-1])


class DistillObjective(Objective):
    def __init__(
        self,
        student: nn.Module,
        teachers: list[nn.Module],
        kd: DictConfig,
        data: Data,
        device: torch.device,
        run_dir: Path,
    ) -> None:
        super().__init__(student)
        self.teachers = teachers
        for t in teachers:
            t.eval().requires_grad_(False)
        self.task_weight = float(kd.task_weight)
        self.epoch = 0  # set by the loop before each epoch (term warm-ups)
        self.each = kd.teacher_mode == "each"
        self.terms: list[Term] = []
        for key, node in kd.terms.items():
            s_paths = resolve_layers(student, node.get("student_layer"), f"kd.terms.{key}.student_layer")
            t_paths = [resolve_layers(t, node.get("teacher_layer"), f"kd.terms.{key}.teacher_layer") for t in teachers]
            if any(len(p) != len(s_paths) for p in t_paths):
                raise UserError(f"kd.terms.{key}: student_layer and teacher_layer must name as many layers")
            warmup = float(node.get("warmup_epochs") or 0)
            self.terms.append(Term(str(key), float(node.weight), s_paths, t_paths, warmup))
        self.s_capture = Capture(student, [p for term in self.terms for p in term.student_paths])
        self.t_captures = [
            Capture(t, [p for term in self.terms for p in term.teacher_paths[i]]) for i, t in enumerate(teachers)
        ]
        # one forward of a blank batch tells every method the shapes it is built for
        probe = data.example(2, device)  # images, or windows of tokens
        with torch.no_grad():
            student.eval()
            student(probe)
            student.train()
            s_shapes = {k: v.shape[1:] for k, v in self.s_capture.take().items()}
            t_outputs = self._teacher_forward(probe)
        views = len(teachers) if self.each else 1
        self.methods = nn.ModuleDict()
        for term, node in zip(self.terms, kd.terms.values(), strict=True):
            args = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in TERM_KEYS}
            method = KD_METHODS.get(node.get("name", term.key))
            built = []
            for v in range(views):
                t_shapes = [t_outputs[v][f"{term.key}.{i}"].shape[1:] for i in range(len(term.student_paths))]
                ctx = KDContext([s_shapes[p] for p in term.student_paths], t_shapes, data.num_classes, len(data.train))
                built.append(method(ctx, **args))
            self.methods[term.key] = nn.ModuleList(built).to(device)
        if not self.each and len(teachers) > 1:
            self._mean_view(t_outputs)  # fails early when the teachers' outputs cannot be averaged
        self.cache, self.topk = None, int(kd.get("cache_topk") or 0)
        if kd.cache_teacher:
            if isinstance(data.train, TextSplit):
                data.train.fixed = True  # the cache keys outputs by sample index: window i must stay window i
            shapes = {
                f"t{i}/{k}": (v.shape[1:], torch.float32) for i, out in enumerate(t_outputs) for k, v in out.items()
            }
            if self.topk:  # checked: one teacher, logit terms of one temperature
                self.topk_tau = float(next(iter(self.methods.values()))[0].temperature)
                per_row = (*t_outputs[0]["logits"].shape[1:-1], self.topk)
                shapes = {"ids": (per_row, torch.int32), "logp": (per_row, torch.float16)}
            self.cache = TeacherCache(run_dir / "teacher_cache", len(data.train), shapes, device)
        self._snapshot = [{k: v.detach().clone() for k, v in t.state_dict().items()} for t in teachers]

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "kd": self.methods}

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # from the loop's state, so a resumed run continues with the same warm-up

    def _teacher_forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for i, (teacher, capture) in enumerate(zip(self.teachers, self.t_captures, strict=True)):
            out = {"logits": teacher(x)}
            feats = capture.take()
            for term in self.terms:
                out.update({f"{term.key}.{j}": feats[p] for j, p in enumerate(term.teacher_paths[i])})
            outputs.append(out)
        return outputs

    def _teacher_outputs(self, x: torch.Tensor, idx: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        if self.cache is not None:
            cached = self.cache.get(idx)
            if cached is not None:
                if self.topk:
                    return [cached]
                return [
                    {k.split("/", 1)[1]: v for k, v in cached.items() if k.startswith(f"t{i}/")}
                    for i in range(len(self.teachers))
                ]
        with torch.no_grad():
            outputs = self._teacher_forward(x)
        if self.topk:
            ids, logp = teacher_topk(outputs[0]["logits"], self.topk, self.topk_tau)
            outputs = [{"ids": ids, "logp": logp}]
            self.cache.put(idx, outputs[0])
        elif self.cache is not None:
            self.cache.put(idx, {f"t{i}/{k}": v for i, out in enumerate(outputs) for k, v in out.items()})
        return outputs

    def _mean_view(self, outputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if len(outputs) == 1:
            return outputs[0]
        try:
            return {k: torch.stack([o[k] for o in outputs]).mean(0) for k in outputs[0]}
        except RuntimeError:
            raise UserError(
                "teachers' outputs differ in shape and cannot be averaged; set kd.teacher_mode=each"
            ) from None

    def loss(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        t_out = self._teacher_outputs(x, idx)  # first: its activations are freed before the student's are made
        logits = self.model(x)
        s_feats = self.s_capture.take()
        views = t_out if self.each else [self._mean_view(t_out)]
        items, targets, target_logp = _items(logits), y.reshape(-1), None  # an LM's every token is one prediction
        if self.topk:  # both sides as distributions over the teacher's cached top-k tokens and the rest
            # at temperature 1 the task's cross-entropy comes from the same softmax (one pass fewer each way)
            shared = y if self.topk_tau == 1.0 else None
            s_logits, t_logits, target_logp = bucket_logits(
                logits, views[0]["ids"], views[0]["logp"], self.topk_tau, shared
            )
            items, views = _items(s_logits), [{"logits": t_logits}]
        task = F.cross_entropy(*Task.flat(logits, y)) if target_logp is None else -target_logp.mean()
        total, parts = self.task_weight * task, {"task_loss": task.detach()}
        for term in self.terms:
            s = Outputs(items, [s_feats[p] for p in term.student_paths])
            value = sum(
                method(s, Outputs(_items(v["logits"]), [v[f"{term.key}.{i}"] for i in range(len(term.student_paths))]),
                       targets, idx)
                for method, v in zip(self.methods[term.key], views, strict=True)
            ) / len(views)  # fmt: skip
            parts[f"kd_{term.key}"] = value.detach()
            total = total + term.weight * warmup_factor(self.epoch, term.warmup_epochs) * value
        return total, logits, parts

    def extra_state(self) -> dict[str, Any]:
        return {"teacher_cache": self.cache.state_dict()} if self.cache is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.cache is not None and "teacher_cache" in state:
            self.cache.load_state_dict(state["teacher_cache"])

    def verify_teachers_frozen(self) -> None:
        """Check, not assume, that no teacher weight or buffer moved during training."""
        for i, (teacher, snapshot) in enumerate(zip(self.teachers, self._snapshot, strict=True)):
            for k, v in teacher.state_dict().items():
                if not torch.equal(v, snapshot[k]):
                    raise RuntimeError(f"teacher {i} changed during distillation ({k}); it must stay frozen")
