"""Checkpoints carry a SHA-256 and keep their predecessor, so a corrupt last.pt resumes from last.prev.pt; loading
anything from disk never runs code (weights_only everywhere, no pickle/eval/instantiate in modrun)."""

import ast
import hashlib
import io
import json
from pathlib import Path

import torch
from conftest import FAST, cli, only_run, read_json

from modrun.core import checkpoint

SOURCE = Path(__file__).resolve().parent.parent / "modrun"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _interrupt(run: Path) -> None:
    """What a kill leaves behind, as far as `modrun resume` is concerned."""
    (run / "status.json").write_text(json.dumps({**read_json(run / "status.json"), "state": "interrupted"}))


def _result(run: Path) -> tuple:
    records = [{k: v for k, v in json.loads(line).items() if k != "time"} for line in open(run / "metrics.jsonl")]
    summary = read_json(run / "summary.json")
    return (run / "model.safetensors").read_bytes(), summary["final"], summary["best"], records


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still a readable zip, only the checksum can tell
    path.write_bytes(bytes(data))


def test_keeps_two_verified_checkpoints_and_resumes_from_the_previous_one_bitwise():
    assert cli("train", *FAST, "trainer.checkpoint_every_steps=15").code == 0  # 40 steps; saves at 15, 30, 40
    run = only_run()
    ckpts = run / "checkpoints"
    for name in ("last.pt", "last.prev.pt", "best.pt"):
        assert (ckpts / f"{name}.sha256").read_text() == f"{_sha(ckpts / name)}  {name}\n"  # sha256sum -c format
    assert torch.load(ckpts / "last.pt", weights_only=True)["state"]["step"] == 40
    assert torch.load(ckpts / "last.prev.pt", weights_only=True)["state"]["step"] == 30
    reference = _result(run)

    data = (ckpts / "last.pt").read_bytes()
    (ckpts / "last.pt").write_bytes(data[: len(data) // 2])  # truncated
    _interrupt(run)
    r = cli("resume", str(run))
    assert r.code == 0, r.text
    line = "checkpoints/last.pt is corrupt (checksum mismatch); resuming from checkpoints/last.prev.pt (step 30)"
    assert line in (run / "log.txt").read_text() and line in r.err
    assert _result(run) == reference  # replayed from step 30: bitwise the uninterrupted result

    for name in ("last.pt", "last.prev.pt"):
        _corrupt(ckpts / name)
    _interrupt(run)
    r = cli("resume", str(run))
    assert r.code == 2 and len([x for x in r.err.splitlines() if x.startswith("modrun: error")]) == 1, r.text
    assert "no usable checkpoint to resume from: checkpoints/last.pt is corrupt (checksum mismatch); " in r.err
    assert "checkpoints/last.prev.pt is corrupt (checksum mismatch)" in r.err and "Traceback" not in r.text


def test_a_kill_between_any_two_writes_leaves_a_verified_checkpoint(tmp_path, monkeypatch):
    """The four writes of a save, interrupted before each one in turn: last.pt is always there and complete,
    and resuming finds a verified checkpoint, the newest complete one."""
    real_write, real_link = checkpoint.atomic_write, checkpoint._link_or_copy

    class Killed(BaseException):
        pass

    for crash_before in range(1, 6):  # 5: no crash
        folder = tmp_path / str(crash_before)
        folder.mkdir()
        for step in (1, 2):
            checkpoint.save(folder / "last.pt", {"state": {"step": step}})
        ops = []

        def write_step(fn, *args, crash_before=crash_before, ops=ops):
            ops.append(args)
            if len(ops) == crash_before:
                raise Killed
            return fn(*args)

        monkeypatch.setattr(checkpoint, "atomic_write", lambda *a: write_step(real_write, *a))
        monkeypatch.setattr(checkpoint, "_link_or_copy", lambda *a: write_step(real_link, *a))
        try:
            checkpoint.save(folder / "last.pt", {"state": {"step": 3}})
        except Killed:
            pass
        monkeypatch.undo()
        assert len(ops) == min(crash_before, 4)
        assert torch.load(folder / "last.pt", weights_only=True)["state"]["step"] in (2, 3)
        assert checkpoint.load_last(folder)["state"]["step"] == (3 if crash_before == 5 else 2)


class Evil:
    """Unpickling this opens (creates) a file: what a malicious checkpoint could do with any callable."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_object_in_a_checkpoint_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"modules": {"model": Evil(marker)}, "state": {"step": 1}}, buffer)
    evil = buffer.getvalue()
    torch.load(io.BytesIO(evil), weights_only=False)  # proof that the file does run code when unpickled freely
    assert marker.exists()
    marker.unlink()

    assert cli("train", *FAST).code == 0
    run = only_run()
    for name in ("last.pt", "best.pt"):  # with matching checksums: only weights_only stands in the way
        (run / "checkpoints" / name).write_bytes(evil)
        (run / "checkpoints" / f"{name}.sha256").write_text(f"{hashlib.sha256(evil).hexdigest()}  {name}\n")
    _interrupt(run)
    r = cli("resume", str(run))
    assert r.code == 2 and len([x for x in r.err.splitlines() if x.startswith("modrun: error")]) == 1, r.text
    assert "checkpoints/last.pt is refused: it holds pickled objects other than tensors: io.open" in r.err
    for weights in ("last", "best"):
        r = cli("eval", str(run), "--weights", weights)
        assert r.code == 2 and f"checkpoints/{weights}.pt is refused" in r.err, r.text
    Path("evil.pt").write_bytes(evil)
    r = cli("distill", *FAST, "teacher.checkpoint=evil.pt")
    assert r.code == 2 and "evil.pt is refused" in r.err, r.text
    assert not marker.exists()


def test_imp_phase_checkpoints_fall_back_too():
    """checkpoints/<phase>/ (an IMP round) keeps two checkpoints and resumes from the previous one."""
    args = [*FAST, "trainer.checkpoint_every_steps=15", "source.epochs=1", "prune=imp", "prune.rounds=1"]
    assert cli("prune", *args).code == 0
    run = only_run("prune")
    reference = _result(run)
    phase = run / "checkpoints" / "imp_round1"
    assert (phase / "last.prev.pt.sha256").is_file()
    _corrupt(phase / "last.pt")
    (phase / "done.json").unlink()  # killed inside the round, after its last save
    _interrupt(run)
    r = cli("resume", str(run))
    assert r.code == 0, r.text
    assert "checkpoints/imp_round1/last.pt is corrupt (checksum mismatch); resuming from " in r.err
    assert _result(run) == reference


# calls that may run code from a file or a string; each entry: dotted call -> why it is unsafe
UNSAFE_CALLS = {
    "pickle.load": "unpickles arbitrary objects",
    "pickle.loads": "unpickles arbitrary objects",
    "pickle.Unpickler": "unpickles arbitrary objects",
    "dill.load": "unpickles",
    "cloudpickle.load": "unpickles",
    "joblib.load": "unpickles",
    "marshal.loads": "loads code objects",
    "shelve.open": "unpickles",
    "torch.jit.load": "runs TorchScript from a file",
    "yaml.unsafe_load": "builds arbitrary objects",
    "yaml.full_load": "builds arbitrary objects",
    "eval": "runs a string",
    "exec": "runs a string",
    "compile": "compiles a string",
    "__import__": "imports by name",
    "instantiate": "Hydra's _target_ instantiation",
    "hydra.utils.instantiate": "Hydra's _target_ instantiation",
    "hydra.utils.call": "Hydra's _target_ call",
    "hydra.utils.get_method": "Hydra's import by path",
    "hydra.utils.get_class": "Hydra's import by path",
}
# reviewed: importlib.import_module takes names from modrun's own constant tables ("module:attr" strings, looked up
# by a registered name), or the user's own +imports / entry points (by design); a new use needs the same review
IMPORT_MODULE_ALLOWED = {"core/registry.py", "recipes/grow.py"}


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Problems of one Python source: unsafe loaders, eval/exec, instantiate, unreviewed dynamic imports."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "hydra.utils", "marshal"):
            problems.append(f"{filename}:{node.lineno}: from {node.module} import ...")
        if not isinstance(node, ast.Call):
            continue
        name, kw = ast.unparse(node.func), {k.arg: k.value for k in node.keywords}
        where = f"{filename}:{node.lineno}: {name}(...)"
        if name in UNSAFE_CALLS:
            problems.append(f"{where} {UNSAFE_CALLS[name]}")
        elif name == "torch.load" and not (
            isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value
        ):
            problems.append(f"{where} without weights_only=True")
        elif name in ("np.load", "numpy.load") and not (
            "allow_pickle" not in kw or (isinstance(kw["allow_pickle"], ast.Constant) and not kw["allow_pickle"].value)
        ):
            problems.append(f"{where} with allow_pickle")
        elif name in ("yaml.load", "yaml.load_all") and "SafeLoader" not in ast.unparse(
            kw.get("Loader", ast.Constant(""))
        ):
            problems.append(f"{where} without Loader=yaml.SafeLoader")
        elif name.endswith("import_module") and filename not in IMPORT_MODULE_ALLOWED:
            problems.append(f"{where} imports by name outside the reviewed modules")
    return problems


def test_the_audit_finds_unsafe_calls():
    bad = """
import torch, yaml, pickle, importlib
from hydra.utils import instantiate
torch.load(p)
torch.load(p, weights_only=False)
yaml.load(s)
np.load(f, allow_pickle=True)
pickle.loads(b)
eval("1")
importlib.import_module(name)
"""
    good = "torch.load(p, weights_only=True)\nyaml.load(s, Loader=yaml.SafeLoader)\nnp.load(f)\nx.eval()\n"
    assert len(unsafe_calls(bad, "new.py")) == 8
    assert unsafe_calls(good, "new.py") == []


def test_modrun_loads_nothing_unsafely():
    """Fails when a new unsafe call appears in modrun/: use checkpoint.load, safetensors, OmegaConf, numpy."""
    problems = []
    for path in sorted(SOURCE.rglob("*.py")):
        problems += unsafe_calls(path.read_text(), path.relative_to(SOURCE).as_posix())
    assert problems == []


def test_target_in_a_config_is_rejected_not_instantiated(tmp_path):
    r = cli("validate", "train", "+model._target_=os.system")
    assert r.code == 2 and "model._target_: not an argument of model 'cnn_small'" in r.err
    r = cli("validate", "train", "model._target_=os.system")
    assert r.code == 2 and "unknown key model._target_" in r.err
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "evil.yaml").write_text(
        "name: cnn_small\n_target_: os.system\ncommand: 'touch pwned'\n"
    )
    r = cli("train", "--config-dir", str(tmp_path / "conf"), "model=evil", *FAST)
    assert r.code == 2 and "model._target_" in r.err and not Path("pwned").exists()
    assert not Path("runs").exists()


def test_best_and_last_of_one_epoch_are_one_file_and_a_later_last_leaves_best_alone(tmp_path):
    checkpoint.save(tmp_path / "last.pt", {"state": {"step": 1}})
    checkpoint.save(tmp_path / "best.pt", {"state": {"step": 2}}, also=(tmp_path / "last.pt",))
    assert (tmp_path / "best.pt").samefile(tmp_path / "last.pt")  # serialised once, linked
    for name in ("best.pt", "last.pt", "last.prev.pt"):
        assert (tmp_path / f"{name}.sha256").read_text() == f"{_sha(tmp_path / name)}  {name}\n"
    assert torch.load(tmp_path / "last.prev.pt", weights_only=True)["state"]["step"] == 1
    checkpoint.save(tmp_path / "last.pt", {"state": {"step": 3}})
    assert torch.load(tmp_path / "best.pt", weights_only=True)["state"]["step"] == 2  # not rewritten in place
    assert torch.load(tmp_path / "last.prev.pt", weights_only=True)["state"]["step"] == 2
    assert checkpoint.load_last(tmp_path)["state"]["step"] == 3


def test_a_last_pt_changed_behind_modruns_back_is_hashed_again_not_kept(tmp_path):
    checkpoint.save(tmp_path / "last.pt", {"state": {"step": 1}})
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")  # the remembered digest no longer describes it
    checkpoint.save(tmp_path / "last.pt", {"state": {"step": 2}})
    assert not (tmp_path / "last.prev.pt").exists()  # a file that does not verify is not kept as the predecessor
    assert checkpoint.load_last(tmp_path)["state"]["step"] == 2


def test_the_best_model_in_hand_is_tested_without_reloading_and_matches_best_pt():
    assert cli("train", *FAST).code == 0  # one epoch: the best is the final model
    run = only_run()
    summary = read_json(run / "summary.json")
    assert summary["best"]["epoch"] == 1 and (run / "checkpoints" / "best.pt").samefile(run / "checkpoints" / "last.pt")
    tested = {k: v for k, v in summary["best"].items() if k.startswith("test/")}
    assert tested and tested == {k: v for k, v in summary["final"].items() if k.startswith("test/")}
    assert cli("eval", str(run), "--weights", "best").code == 0
    record = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert {k: record[k] for k in tested} == tested  # best.pt, loaded and evaluated by `modrun eval`
