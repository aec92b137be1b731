"""Bad input of every kind, hand-written and fuzzed: exit 2 with one `modrun: error:` line per problem, never a
traceback, never a run folder left behind. The fuzzer builds override lists from the real config vocabulary
(keys of the composed configs, groups and options of the config tree, registry names) and mutates them."""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import pytest
from conftest import cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, ListConfig, OmegaConf

COMMANDS = ("train", "distill", "prune")


# --- a zoo of folders and files that are wrong in one way each, made without training anything ----------------


def _fake_run(folder: Path, overrides: list[str], state: str = "completed", weights_of: list[str] | None = None) -> str:
    """A run folder as a finished `modrun train` leaves it (config, status, weights), in milliseconds."""
    from safetensors.torch import save_file

    from modrun.components.build import build_model
    from modrun.runner.compose import Composer

    with Composer("train") as composer:
        cfg = composer.compose(overrides)
        model_cfg = composer.compose(weights_of) if weights_of is not None else cfg
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (folder / "status.json").write_text(json.dumps({"state": state, "command": "train"}))
    model = build_model(OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True)).model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("zoo")
    z = {
        "cnn": _fake_run(root / "cnn", ["model.width=8"]),
        "resnet": _fake_run(root / "resnet", ["model=resnet20", "model.width=0.25"]),
        # the config of a cnn_small, the weights of a resnet20: `modrun eval` and teacher.run must notice
        "swapped": _fake_run(root / "swapped", ["model.width=8"], weights_of=["model=resnet20", "model.width=0.25"]),
        "running": _fake_run(root / "running", ["model.width=8"], state="running"),
    }
    z["res_w"] = str(Path(z["resnet"]) / "model.safetensors")
    for name, files in {
        "notrun": {"notes.txt": "just a folder"},
        "noconfig": {"status.json": '{"state": "completed", "command": "train"}'},
        "badconfig": {"config.yaml": "model: [unbalanced\n", "status.json": '{"state": "failed", "command": "train"}'},
        "badstatus": {"config.yaml": "seed: 0\n", "status.json": "{not json"},
        "badsweep": {"sweep.json": '{"command": "train", "jobs": [{"num": 0}]}'},
    }.items():
        (root / name).mkdir()
        for file, text in files.items():
            (root / name / file).write_text(text)
        z[name] = str(root / name)
    (root / "noweights").mkdir()
    for file in ("config.yaml", "status.json"):
        (root / "noweights" / file).write_text((Path(z["cnn"]) / file).read_text())
    z["noweights"] = str(root / "noweights")
    (root / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (root / "garbage.pt").write_bytes(b"PK\x03\x04 not really a zip")
    (root / "afile").write_text("a file, not a folder")
    z.update(garbage_st=str(root / "garbage.safetensors"), garbage_pt=str(root / "garbage.pt"))
    z["afile"] = str(root / "afile")
    return z


# (command and arguments with {zoo} placeholders, a fragment the single error line must contain)
HAND_CASES = [
    # unknown groups, keys and values
    ("train modle=cnn_small", "unknown key modle — did you mean model?"),
    ("train model=resnet2000", "no such model config"),
    ("train foo/bar=1", "unknown key foo/bar"),
    ("train optim.lrr=0.1", "did you mean optim.lr?"),
    ("train model.name=resnet2", "unknown model — did you mean resnet20?"),
    ("train sched.name=cosin", "unknown scheduler — did you mean cosine?"),
    ("train experiment=nope", "no such experiment config"),
    ("distill kd=dkdd", "no such kd config — did you mean dkd?"),
    ("distill kd.terms.kd.name=kdd", "unknown kd method"),
    ("prune prune=magnitud", "no such prune config — did you mean magnitude?"),
    ("prune recover=finetuning", "no such recover config — did you mean finetune?"),
    ("prune prune.include=[nothing*]", "no Conv2d/Linear layer matches"),
    ("prune prune=gradual_magnitude recover=none", "prunes during training"),
    ("train trainer=nope", "no such trainer config"),
    # wrong types
    ("train trainer.epochs=abc", "trainer.epochs=abc: expects an integer"),
    ("train optim.lr=[0.1]", "expects a number, got a list"),
    ("train data.batch_size=1.5", "expects an integer"),
    ("train trainer.deterministic=2", "expects true or false"),
    ("train model.width={a:1}", "expects an integer, got a mapping"),
    ("train seed=''", "seed='': expects an integer"),
    ("train seed=null", "seed=null: expects an integer, got null"),
    ("prune prune.include=conv", "expects a list"),
    ("distill teacher.run=5", "teacher.run=5: expects the path of a run folder"),
    ("distill teacher.epochs=run", "teacher.epochs=run: expects a whole number >= 0 (or null)"),
    ("train trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: must be >= 1"),
    ("train +imports=notalist", "expects a list of module names"),
    # syntax and prefixes on the wrong keys
    ("train optim.lr=[0.1", "bad override syntax"),
    ("train optim.lr='0.1", "bad override syntax"),
    ("train name=${nope}", "name: cannot be resolved"),
    ("train +optim.lr=1", "+optim.lr: optim.lr already exists"),
    ("train ~optim.lrr", "no key optim.lrr to delete"),
    ("train ~trainer.epochs", "~trainer.epochs: trainer.epochs is needed by the run"),
    ("train ~model", "~model: model is needed by the run"),
    ("train ++model.depth=3", "model.depth: not an argument of model 'cnn_small'"),
    ("distill +kd=dkd", "Multiple values for kd"),
    # missing files and folders
    ("train data=image_folder data.path=nowhere data.num_classes=2", "data.path=nowhere: no such file"),
    ("train data=cifar10 data.root=nowhere", "data.root=nowhere: no such file"),
    ("distill teacher.run=nowhere", "teacher.run=nowhere: not a modrun run folder"),
    ("distill teacher.checkpoint=nowhere.safetensors", "no such file"),
    ("prune source.run=nowhere", "source.run=nowhere: not a modrun run folder"),
    ("prune source.checkpoint=nowhere.pt", "source.checkpoint=nowhere.pt: no such file"),
    ("train +imports=[not_a_module_xyz]", "cannot import module 'not_a_module_xyz'"),
    ("train --config-dir nowhere", "--config-dir"),
    ("train runs_dir={afile}", "is a file, not a folder"),
    # run folders of the wrong kind
    ("resume {notrun}", "not a modrun run folder"),
    ("resume {noconfig}", "not a modrun run folder"),
    ("resume {badconfig}", "cannot read config.yaml/status.json"),
    ("resume {badstatus}", "cannot read config.yaml/status.json"),
    ("resume {badsweep}", "cannot be read as a sweep record"),
    ("eval {noweights}", "has no model.safetensors"),
    ("eval {notrun}", "not a modrun run folder"),
    ("distill teacher.run={notrun}", "not a modrun run folder"),
    ("distill teacher.run={noweights}", "that run has no model.safetensors"),
    ("distill teacher.run={running}", "that run is running, not completed"),
    ("prune source.run={badconfig}", "cannot read its record"),
    # weights of a different architecture, or not weights at all
    ("distill model@teacher=cnn_small teacher.checkpoint={res_w}", "weights do not fit the model 'cnn_small'"),
    ("prune source.checkpoint={res_w}", "weights do not fit the model 'cnn_small'"),
    ("distill teacher.run={swapped}", "weights do not fit the model 'cnn_small'"),
    ("prune source.run={swapped}", "weights do not fit the model 'cnn_small'"),
    ("eval {swapped}", "do not fit the model"),
    ("distill teacher.checkpoint={garbage_st}", "cannot read weights"),
    ("distill teacher.checkpoint={garbage_pt}", "garbage.pt"),
    # non-finite, negative, zero and huge hyper-parameters
    ("train optim.lr=nan", "optim.lr=nan: must be a finite number"),
    ("train optim.lr=inf", "optim.lr=inf: must be a finite number"),
    ("train optim.lr=-1", "optim.lr=-1: must be > 0"),
    ("train optim.lr=1e400", "must be a finite number"),
    ("train optim.momentum=-0.5", "Invalid momentum value"),
    ("train optim.weight_decay=-1", "Invalid weight_decay value"),
    ("train trainer.epochs=-1", "trainer.epochs=-1: must be >= 0"),
    ("train trainer.epochs=100000000000000000000", "too large"),
    ("train seed=18446744073709551616", "too large"),
    ("train data.batch_size=0", "data.batch_size=0: must be >= 1"),
    ("train data.image_size=0", "data.image_size=0: must be >= 1"),
    ("train trainer.grad_clip=-1", "trainer.grad_clip=-1: must be > 0"),
    ("train sched.warmup_epochs=-2", "must be >= 0"),
    ("train sched=step sched.gamma=nan", "sched.gamma=nan: must be a finite number"),
    ("train model.width=0", "layers without weights"),
    ("train model.width=-3", "cannot be built"),
    ("train model.dropout=1.5", "dropout probability"),
    ("distill kd.temperature=0", "kd.terms.kd.temperature=0: must be > 0"),
    ("distill kd.weight=-1", "kd.terms.kd.weight=-1: must be >= 0"),
    ("distill kd=dkd kd.beta=-inf", "must be a finite number"),
    ("distill kd.task_weight=nan", "must be a finite number"),
    ("prune prune.sparsity=1.5", "prune.sparsity=1.5: must be in [0, 1)"),
    ("prune prune.sparsity=-0.1", "must be in [0, 1)"),
    ("prune prune=gradual_magnitude prune.every=0", "prune.every=0: must be >= 1"),
    ("prune prune=gradual_magnitude prune.start=0.9 prune.end=0.1", "need 0 <= start < end <= 1"),
    ("prune prune=channel prune.ratio=1", "prune.ratio=1: must be in (0, 1)"),
    ("prune prune=imp prune.rounds=0", "prune.rounds=0: must be >= 1"),
    ("prune prune=sensitivity prune.target=1.2", "need values in [0, 1)"),
    ("prune recover=distill kd.temperature=-4", "must be > 0"),
    # issue #15: files placed outside the run folder, odd runs_dir, imports, late Hydra errors, sweeps
    ("train hydra.output_subdir=/tmp/elsewhere", "hydra.output_subdir"),
    ("train hydra.output_subdir=../../x", "hydra.output_subdir"),
    ("train hydra.run.dir=/tmp/x", "hydra.run.dir"),
    ("train +hydra.job_logging.handlers.f.filename=/tmp/x.log", "hydra.job_logging.handlers.f.filename"),
    ("train hydra.mode=MULTIRUN", "hydra.mode"),
    ("train runs_dir=null", "runs_dir"),
    ("train +imports=['']", "+imports"),
    ("train +imports=[.foo]", "+imports"),
    ("train name=" + "n" * 5000, "name"),
    ("sweep train seed=0,1 sweep.objective=val/acc", "did you mean val/top1?"),
    ("sweep train seed=0,1 sweep.objective=val/los", "did you mean val/loss?"),
    ("sweep train seed=0,1 sweep.objective=test/ppl", "sweep.objective=test/ppl"),
    ("sweep train seed=0,1 sweep.direction=up", "sweep.direction=up"),
    ("sweep train optim.lr=interval(0.01,0.1)", "hydra/sweeper=optuna"),
    ("sweep train trainer.epochs=1", "at least one swept key"),
    ("sweep train seed=0,1 optim.lrr=0.1", "did you mean optim.lr?"),
    ("resume {afile}", "not a modrun run folder"),
    ("eval {afile}", "not a modrun run folder"),
    ("reproduce {notrun}", "not a modrun run folder"),
]


def _no_run_folder() -> bool:
    runs = Path("runs")
    return not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize(("line", "expected"), HAND_CASES, ids=[c[0] for c in HAND_CASES])
def test_hand_written_bad_input(line: str, expected: str, zoo: dict[str, str]) -> None:
    # a run command gets 1 epoch first: should a case slip through validation, the test fails fast, not slowly
    args = [functools.reduce(lambda a, kv: a.replace("{" + kv[0] + "}", kv[1]), zoo.items(), a) for a in line.split()]
    args = [args[0], "trainer.epochs=1", *args[1:]] if args[0] in COMMANDS and "--" not in line else args
    r = cli(*args)
    assert r.code == 2, r.text
    assert "Traceback" not in r.text
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modrun: error: "), lines
    assert expected in lines[0], lines[0]
    assert _no_run_folder(), [str(p) for p in Path("runs").rglob("*")]


# --- the fuzzer ---------------------------------------------------------------------------------------------------

EXAMPLES = {c: 0 for c in COMMANDS}  # examples tried per command, printed by the last test
REJECTED: set[tuple[str, ...]] = set()  # distinct fuzzed inputs refused with exit 2 and only error lines
BAD_INPUTS_TARGET = 300  # hand-written cases plus distinct fuzzed rejections (issue #15)
FUZZ_EXAMPLES = 120  # per command
PATHS = ["nowhere", "nowhere/w.safetensors", ".", "afile", "/nonexistent/run", "runs"]
PATH_KEYS = ["data.path", "data.root", "teacher.run", "teacher.checkpoint", "source.run", "source.checkpoint"]
SPECIAL = ["nan", "inf", "-inf", "-1", "0", "-0.0", "1e308", "1e400", "100000000000000000000", "-99999999999"]
WRONG = ["abc", "[1,2]", "{a:1}", "true", "null", "''", "'1'", "[]", "{}", "-", "x y"]
BROKEN = ["[1,2", "'abc", '"abc', "{a:1", "]", "a=b", "${", "${nope}", "(1)", "1,2", "=", "\\"]


@functools.cache
def vocabulary(command: str) -> dict:
    """What the fuzzer draws from: keys and values of the composed config, groups and their options, names."""
    from modrun.core.registry import REGISTRIES
    from modrun.runner.checks import dotted_keys
    from modrun.runner.compose import Composer

    with Composer(command) as composer:
        cfg = composer.compose([])
        groups = {g: composer.options(g) for g in composer.groups()}
    leaves = {}
    for key in dotted_keys(cfg):
        node = OmegaConf.select(cfg, key, throw_on_missing=False)
        if not isinstance(node, DictConfig):
            leaves[key] = OmegaConf.to_container(node) if isinstance(node, ListConfig) else node
    names = sorted({n for r in REGISTRIES.values() for n in r.names()})
    return {"leaves": leaves, "groups": groups, "names": names, "top": sorted(cfg.keys())}


def _typo(draw, text: str) -> str:
    """One edit: a character dropped, doubled, replaced, or two swapped."""
    if not text:
        return "x"
    i = draw(st.integers(0, len(text) - 1))
    op = draw(st.sampled_from(["drop", "double", "replace", "swap"]))
    if op == "drop":
        return text[:i] + text[i + 1 :] or "x"
    if op == "double":
        return text[:i] + text[i] + text[i:]
    if op == "replace":
        return text[:i] + draw(st.sampled_from("aeiouxz_.")) + text[i + 1 :]
    j = min(i + 1, len(text) - 1)
    return text[:i] + text[j] + text[i] + text[j + 1 :] if j > i else text


def _good_value(draw, value: object) -> str:
    """A value of the same kind as the default, often a plausible one."""
    if isinstance(value, bool):
        return draw(st.sampled_from(["true", "false"]))
    if isinstance(value, int):
        return str(draw(st.one_of(st.just(value), st.integers(0, 8))))
    if isinstance(value, float):
        factor = draw(st.sampled_from([0.5, 1.0, 2.0, 0.1]))
        return repr(value * factor if math.isfinite(value * factor) else value)
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return draw(st.sampled_from(["null", "run"])) if value is None else f"'{value}'"


@st.composite
def override(draw, command: str) -> str:
    v = vocabulary(command)
    keys = sorted(v["leaves"])
    key = draw(st.sampled_from(keys))
    group = draw(st.sampled_from(sorted(v["groups"])))
    options = v["groups"][group] or ["none"]
    kind = draw(
        st.sampled_from(
            ["good", "good", "good", "typo_key", "wrong", "special", "empty", "broken", "group", "group", "group_typo"]
            + ["unknown_group", "prefix", "path", "name", "hydra"]
        )
    )
    if kind == "good":
        return f"{key}={_good_value(draw, v['leaves'][key])}"
    if kind == "typo_key":
        return f"{_typo(draw, key)}={_good_value(draw, v['leaves'][key])}"
    if kind == "wrong":
        return f"{key}={draw(st.sampled_from(WRONG))}"
    if kind == "special":
        numeric = [k for k in keys if isinstance(v["leaves"][k], (int, float)) and not isinstance(v["leaves"][k], bool)]
        return f"{draw(st.sampled_from(numeric))}={draw(st.sampled_from(SPECIAL))}"
    if kind == "empty":
        return f"{key}=" + draw(st.sampled_from(["", "''", '""']))
    if kind == "broken":
        return f"{draw(st.sampled_from([key, group, '', ' ']))}={draw(st.sampled_from(BROKEN))}"
    if kind == "group":
        return f"{group}={draw(st.sampled_from(options))}"
    if kind == "group_typo":
        return f"{group}={_typo(draw, draw(st.sampled_from(options)))}"
    if kind == "unknown_group":
        return draw(st.sampled_from([f"{_typo(draw, group)}={options[0]}", f"{group}/sub={options[0]}", "nope=x"]))
    if kind == "prefix":
        prefix = draw(st.sampled_from(["+", "~", "++"]))
        target = draw(st.sampled_from([key, _typo(draw, key), group, f"{key}.deeper"]))
        value = "" if prefix == "~" and draw(st.booleans()) else f"={_good_value(draw, v['leaves'][key])}"
        return f"{prefix}{target}{value}"
    if kind == "path":
        return f"{draw(st.sampled_from(PATH_KEYS))}={draw(st.sampled_from(PATHS))}"
    if kind == "name":
        node = draw(st.sampled_from(["model", "optim", "sched", "data", "prune", "logger", "kd.terms.kd", "teacher"]))
        name = draw(st.sampled_from(v["names"]))
        return f"{node}.name={draw(st.sampled_from([name, _typo(draw, name)]))}"
    # hydra's own overrides must not trip modrun up either
    return draw(st.sampled_from(["hydra/launcher=basic", "hydra/launcher=jobllib", "hydra.job.chdir=false"]))


def _check_validate(command: str, overrides: list[str]) -> None:
    """The property: exit 0 with a config that composes, or exit 2 with only `modrun: error:` lines."""
    EXAMPLES[command] += 1
    before = sorted(str(p) for p in Path(".").rglob("*"))
    r = cli("validate", command, *overrides)
    assert "Traceback" not in r.text, (overrides, r.text)
    assert r.code in (0, 2), (overrides, r.code, r.text)
    assert sorted(str(p) for p in Path(".").rglob("*")) == before, ("validate wrote files", overrides)
    if r.code == 2:
        lines = r.err.strip().splitlines()
        assert lines and all(line.startswith("modrun: error: ") for line in lines), (overrides, lines)
        REJECTED.add((command, *overrides))
        return
    from modrun.runner.checks import OPTIONAL_NODES, check_config

    printed = OmegaConf.create(r.out)
    assert isinstance(printed, DictConfig), (overrides, r.out)
    missing = [k for k in vocabulary(command)["top"] if k not in printed and k not in OPTIONAL_NODES]
    assert not missing, (overrides, missing)
    assert check_config(printed, printed) == [], (overrides, check_config(printed, printed))
    assert r.err.strip() == f"# {command} config is valid", (overrides, r.err)


FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every machine and every run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("command", COMMANDS)
def test_fuzzed_overrides_are_valid_or_one_line_errors(command: str) -> None:
    Path("afile").write_text("a file where a folder or weights are expected")

    @FUZZ
    @given(st.lists(override(command), min_size=1, max_size=4))
    def check(overrides: list[str]) -> None:
        _check_validate(command, overrides)

    check()


def test_fuzz_example_count() -> None:
    """Prints how many override lists the fuzzer tried (run with -s to see it)."""
    total = sum(EXAMPLES.values())
    if total < FUZZ_EXAMPLES * len(COMMANDS):
        pytest.skip("the fuzz tests did not all run in this session (-k, --lf, xdist)")
    bad = len({c[0] for c in HAND_CASES}) + len(REJECTED)
    print(
        f"\nfuzzed override lists tried: {total} ({EXAMPLES}), refused: {len(REJECTED)}; hand-written cases: "
        f"{len(HAND_CASES)}; distinct bad inputs: {bad}"
    )
    assert total >= FUZZ_EXAMPLES * len(COMMANDS) or os.environ.get("PYTEST_XDIST_WORKER")
    assert bad >= BAD_INPUTS_TARGET or os.environ.get("PYTEST_XDIST_WORKER"), bad
