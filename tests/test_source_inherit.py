"""`source.run=RUN` brings that run's model and data: prune and grow on a GPT need no model=/data= of their own,
the user's own overrides still win, and a record's values cannot smuggle interpolations or overrides in."""

from pathlib import Path

import pytest
import yaml
from conftest import FAST, cli, only_run
from hydra.core.override_parser.overrides_parser import OverridesParser
from test_lm import TINY

from modrun.runner.inherit import _hydra_value


def _lm_source(runs: str = "src", *extra: str) -> Path:
    r = cli("train", *TINY, "trainer.epochs=1", "data.windows_per_epoch=32", f"runs_dir={runs}", *extra)
    assert r.code == 0, r.text
    return only_run(runs_dir=Path(runs))


def test_prune_takes_the_source_runs_model_and_data():
    source = _lm_source()
    r = cli("prune", f"source.run={source}", "prune=magnitude", "recover=finetune", "trainer.epochs=1",
            "data.windows_per_epoch=16", "trainer.progress=false")  # fmt: skip
    assert r.code == 0, r.text
    cfg = yaml.safe_load((only_run("prune") / "config.yaml").read_text())
    assert cfg["data"]["name"] == "python_docs" and cfg["data"]["block_size"] == 32
    assert cfg["model"]["name"] == "gpt" and cfg["model"]["n_embd"] == 32 and cfg["model"]["n_layer"] == 1
    assert cfg["data"]["windows_per_epoch"] == 16  # the user's own override comes after the inherited ones
    assert cfg["data"]["batch_size"] == 16  # the source's value where the option's default (32) differs
    assert "test/bpb" in (only_run("prune") / "summary.json").read_text()


def test_a_named_data_group_is_not_replaced():
    source = _lm_source()
    r = cli("validate", "prune", f"source.run={source}", "data=digits")
    assert r.code == 2 and "language model" in r.text and "Traceback" not in r.text


def test_grow_takes_the_source_runs_data():
    r = cli("train", *FAST, "data=synthetic", "data.image_size=12", "runs_dir=src")
    assert r.code == 0, r.text
    source = only_run(runs_dir=Path("src"))
    r = cli("validate", "grow", f"source.run={source}", "grow=net2wider")
    assert r.code == 0, r.text
    cfg = yaml.safe_load(r.out)
    assert cfg["data"]["name"] == "synthetic" and cfg["data"]["image_size"] == 12 and cfg["model"]["width"] == 16


def test_a_sweep_over_sources_of_different_data_is_refused():
    a = _lm_source("a")
    r = cli("train", *FAST, "runs_dir=b")
    assert r.code == 0, r.text
    b = only_run(runs_dir=Path("b"))
    r = cli("sweep", "prune", f"source.run={a},{b}", "recover=none")
    assert r.code == 2 and "different models or data" in r.text


def test_a_record_with_an_interpolation_is_refused():
    source = _lm_source()
    record = source / "config.yaml"
    cfg = yaml.safe_load(record.read_text())
    cfg["data"]["name_extra"] = "${oc.env:HOME}"
    record.write_text(yaml.safe_dump(cfg))
    r = cli("validate", "prune", f"source.run={source}")
    assert r.code == 2 and "interpolation at data.name_extra" in r.text


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "it's, a=b ${x",
        "back\\slash",
        "end\\",
        "a\\'b",
        "c:\\\\x",
        "",
        3,
        -2.5e-05,
        True,
        None,
        [1, "a,b", [2.0]],
        {"k": "v w", "n": [1]},
    ],
)
def test_recorded_values_read_back_as_themselves(value):
    if isinstance(value, str) and "${" in value:
        with pytest.raises(Exception, match="interpolation"):
            _hydra_value(value, "data.x")
        return
    o = OverridesParser.create().parse_overrides([f"data.x={_hydra_value(value, 'data.x')}"])[0]
    assert o.value() == value


def test_distill_takes_the_teacher_runs_architecture():
    teacher = _lm_source("t", "model.n_layer=2")
    r = cli("validate", "distill", *TINY, f"teacher.run={teacher}")
    assert r.code == 0, r.text  # before: the packaged model@teacher (a CNN) was checked against text data
    cfg = yaml.safe_load(r.out)
    assert cfg["teacher"]["name"] == "gpt" and cfg["teacher"]["n_layer"] == 2 and cfg["teacher"]["run"] == str(teacher)
    r = cli("validate", "distill", *TINY, f"teacher.run={teacher}", "model@teacher=cnn_small")
    assert r.code == 2 and "classifies images" in r.text  # a teacher architecture the user named stays theirs
