"""m2mKD on transformer blocks: a 4-block GPT teacher grouped onto a 2-block, narrower student (and a ViT) through
the real CLI, the grouped hybrid against the forward pass written out, the teacher's non-stage weights copied
module by module, a resume inside a stage phase, and counts that do not divide refused before any run."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cli, only_run, read_json, read_metrics
from omegaconf import OmegaConf
from torch import nn

from modrun.components.data.tasks import language_modeling
from modrun.components.models.gpt import GPT
from modrun.components.models.vit import ViT
from modrun.core.errors import UserError
from modrun.methods.distill import m2m as m2m_module
from modrun.methods.distill.m2m import Hybrid, StageObjective, _copy_matching, bridge, pair_stages, stage_shapes

GPTS = ["experiment=kd_lm_python_docs", "kd=m2m", "kd.m2m.epochs=1", "teacher.epochs=1", "teacher.n_layer=4"]
GPTS += ["teacher.n_embd=32", "teacher.n_head=2", "model.n_layer=2", "model.n_embd=16", "model.n_head=2"]
GPTS += ["data.block_size=32", "data.windows_per_epoch=64", "data.val_fraction=0.02", "data.test_fraction=0.02"]
GPTS += ["data.batch_size=16", "trainer.epochs=1", "trainer.progress=false"]
M2M = {"student_stages": "all", "teacher_stages": "all", "temperature": 2.0, "stage_weight": 1.0, "logit_weight": 1.0}
M2M = OmegaConf.create(M2M)


def test_a_gpt_teacher_of_4_blocks_teaches_a_narrower_2_block_student_in_groups_of_two():
    r = cli("distill", *GPTS)
    assert r.code == 0, r.text
    assert (
        "stage 0: student blocks.0 inside the teacher in place of blocks.0+blocks.1 (adapters: 32x32 -> 32x16" in r.err
    )
    assert "stage 1: student blocks.1 inside the teacher in place of blocks.2+blocks.3" in r.err
    run = only_run("distill")
    summary = read_json(run / "summary.json")
    assert set(summary["m2m_phase1"]) == {"m2m_stage0", "m2m_stage1"}
    assert {"val/loss", "val/ppl", "val/bpb"} <= set(summary["final"]) and summary["final"]["val/bpb"] < 8.5
    assert all("val/bpb" in stage["final"] for stage in summary["m2m_phase1"].values())
    records = read_metrics(run)
    stage = next(m for m in records if m.get("phase") == "m2m_stage1" and m["split"] == "train_epoch")
    assert stage["stage_loss"] > 0 and stage["logit_loss"] > 0
    assert any("kd_kd" in m for m in records if m.get("phase") is None)  # phase 2: the token-level kd term


def _hidden(model: GPT, x: torch.Tensor) -> torch.Tensor:
    h = model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1]))
    return model.drop(h)


@pytest.mark.parametrize("width", [32, 16])
def test_the_grouped_hybrid_runs_the_student_block_in_place_of_the_teacher_group(width):
    torch.manual_seed(0)
    teacher, student = GPT(64, 16, 4, 2, 32).eval(), GPT(64, 16, 2, 2, width)
    s_paths, groups = pair_stages(student, teacher, M2M)
    assert s_paths == ["blocks.0", "blocks.1"] and groups == [["blocks.0", "blocks.1"], ["blocks.2", "blocks.3"]]
    x = torch.randint(0, 64, (3, 16))
    shapes = stage_shapes(teacher, groups, x)
    assert shapes == [(torch.Size([16, 32]), torch.Size([16, 32]))] * 2
    for i, group in enumerate(groups):
        stage = bridge(student.blocks[i], stage_shapes(student, [[s_paths[i]]], x)[0], shapes[i])
        assert (stage is student.blocks[i]) == (width == 32)
        hybrid = Hybrid(teacher, group, stage).train()
        assert isinstance(hybrid.net.get_submodule(group[1]), nn.Identity)
        assert hybrid.net.get_submodule(group[0]) is stage and stage.training and not hybrid.net.ln_f.training
        with torch.no_grad():
            h = _hidden(teacher, x)
            for j in range(4):
                if j == 2 * i:  # the group [2i, 2i + 2) is the student block, between adapters when narrower
                    h = stage.out(student.blocks[i](stage.into(h))) if width != 32 else student.blocks[i](h)
                elif j != 2 * i + 1:
                    h = teacher.blocks[j](h)
            expected = F.linear(teacher.ln_f(h), teacher.tok_emb.weight)
            assert torch.equal(hybrid(x), expected)
            # the stage target: the output of the group's last teacher block
            objective = StageObjective(hybrid, teacher, group[-1], M2M, 1.0, language_modeling())
            t_logits, target = objective.targets(x)
            h = _hidden(teacher, x)
            for j in range(2 * i + 2):
                h = teacher.blocks[j](h)
            assert torch.equal(target, h) and torch.equal(t_logits, teacher(x))
        loss, logits, parts = objective.loss(x, torch.randint(0, 64, (3, 16)), torch.arange(3))
        loss.backward()
        objective.close()
        assert logits.shape == (3, 16, 64) and parts["stage_loss"] > 0 and parts["logit_loss"] > 0
        assert all(p.grad is None for p in teacher.parameters())  # the frozen teacher (and its copy) learn nothing
        assert student.blocks[i].attn.qkv.weight.grad is not None


def test_non_stage_weights_are_copied_module_by_module_and_a_tied_head_follows_its_embedding():
    torch.manual_seed(0)
    teacher, student = GPT(64, 16, 4, 2, 32), GPT(64, 16, 2, 2, 32)
    assert _copy_matching(teacher, student, ["blocks.0", "blocks.1"]) == ["ln_f", "pos_emb", "tok_emb"]
    assert torch.equal(student.head.weight, teacher.tok_emb.weight)  # the tied head reads the copied matrix
    assert not torch.equal(student.blocks[0].mlp.fc.weight, teacher.blocks[0].mlp.fc.weight)
    untied = GPT(64, 16, 2, 2, 32, tie_weights=False)
    assert "head" in _copy_matching(teacher, untied, ["blocks.0", "blocks.1"])
    assert torch.equal(untied.head.weight, teacher.tok_emb.weight)
    narrow_vit = ViT(1, 10, 8, 2, 2, 2, 16)
    assert _copy_matching(ViT(1, 10, 8, 2, 4, 2, 32), narrow_vit, ["blocks.0", "blocks.1"]) == []  # no lone head bias


def test_a_vit_teacher_of_4_blocks_teaches_a_2_block_student_on_digits():
    args = ["experiment=vit_digits", "model@teacher=vit", "kd=m2m", "kd.m2m.epochs=1", "teacher.epochs=1"]
    args += ["teacher.depth=4", "teacher.dim=32", "teacher.heads=2", "model.depth=2", "model.dim=32"]
    r = cli("distill", *args, "model.heads=2", "trainer.epochs=1", "trainer.progress=false")
    assert r.code == 0, r.text
    assert "copied from the teacher where shapes match: cls_token, head, norm, patch_embed, pos_embed" in r.err
    assert "stage 1: student blocks.1 inside the teacher in place of blocks.2+blocks.3\n" in r.err  # drop-in
    summary = read_json(only_run("distill") / "summary.json")
    assert set(summary["m2m_phase1"]) == {"m2m_stage0", "m2m_stage1"} and "test/top1" in summary["final"]


def test_a_gpt_m2m_run_interrupted_inside_stage_1_resumes_to_the_same_weights(monkeypatch):
    args = [*GPTS, "kd.m2m.epochs=2", "trainer.checkpoint_every_steps=2"]
    assert cli("distill", *args, "name=ref").code == 0
    loss, calls = StageObjective.loss, []

    def interrupted(self, x, y, idx):  # stage 1's fifth step: after its checkpoint at step 4
        calls.append(self.t_capture.paths[0])
        if calls.count("blocks.3") == 5:
            raise KeyboardInterrupt
        return loss(self, x, y, idx)

    monkeypatch.setattr(m2m_module.StageObjective, "loss", interrupted)
    assert cli("distill", *args, "name=killed").code == 130
    run = next(p for p in (Path("runs") / "distill").iterdir() if p.name.endswith("killed"))
    assert read_json(run / "status.json")["state"] == "interrupted"
    assert (run / "checkpoints" / "m2m_stage0" / "done.json").exists()
    assert not (run / "checkpoints" / "m2m_stage1" / "done.json").exists()
    monkeypatch.setattr(m2m_module.StageObjective, "loss", loss)
    r = cli("resume", str(run))
    assert r.code == 0, r.text
    ref = next(p for p in (Path("runs") / "distill").iterdir() if p.name.endswith("ref"))
    assert (run / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert read_json(run / "summary.json")["final"] == read_json(ref / "summary.json")["final"]


def test_a_teacher_of_3_blocks_cannot_be_grouped_onto_2_and_no_run_is_made():
    r = cli("distill", *GPTS, "teacher.n_layer=3")
    assert r.code == 2
    assert r.err.strip().splitlines() == [
        "modrun: error: kd.m2m: 2 student stages but 3 teacher stages; kd.m2m.teacher_stages must give as many, "
        "or a multiple of 2 (groups of consecutive blocks)"
    ]
    assert not Path("runs").exists()  # refused by validation, before a teacher is trained or a folder made
    with pytest.raises(UserError, match="kd.m2m: 2 student stages but 3"):
        pair_stages(GPT(64, 16, 2, 2, 16), GPT(64, 16, 3, 2, 32), M2M)
