"""Issue #15, the record scan: every command that reads a run folder (or a sweep folder) survives each record it
reads being absent, empty, garbage, the wrong JSON/YAML type, or a folder: exit 0 or one `modrun: error:` line
(exit 2) that leaves the folder as it was, never a traceback. One real tiny run and sweep, damaged copies of them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import FAST, cli, only_run

TINY = [*FAST[:1], "model.width=4", *FAST[2:]]
WORK = ["trainer.epochs=0", "trainer.progress=false"]  # distill and prune: check the records, train nothing
DAMAGES = {
    "absent": None,
    "empty": b"",
    "garbage": b"\x00\xff{not: [json, \x80 nor yaml",
    "wrong-type": b"[1, 2, 3]\n",
    "a-folder": "dir",
}
# (command line with {run}/{other}/{sweep} placeholders, the records it reads)
READERS = [
    ("runs list runs", ["status.json", "summary.json"]),
    ("runs show {run}", ["status.json", "summary.json", "overrides.txt", "metrics.jsonl", "prerequisites.json"]),
    ("runs compare {run} {other}", ["status.json", "summary.json", "overrides.txt", "metrics.jsonl"]),
    ("eval {run}", ["config.yaml", "status.json", "model.safetensors", "evals.jsonl"]),
    ("resume {run}", ["config.yaml", "status.json"]),
    ("reproduce {run}", ["config.yaml", "overrides.txt", "status.json", "summary.json"]),
    ("soup {run} {other}", ["config.yaml", "status.json", "summary.json", "model.safetensors"]),
    ("distill teacher.run={run} " + " ".join(WORK), ["config.yaml", "status.json", "model.safetensors"]),
    ("prune source.run={run} " + " ".join(WORK), ["config.yaml", "status.json", "model.safetensors"]),
    ("resume {sweep}", ["sweep.json"]),
    ("runs compare {sweep}", ["sweep.json"]),
]
CASES = [(line, name, kind) for line, names in READERS for name in names for kind in DAMAGES]


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed tiny train run (with an eval record) and a completed sweep of two jobs."""
    root = tmp_path_factory.mktemp("originals")
    old = Path.cwd()
    try:
        import os

        os.chdir(root)
        assert cli("train", *TINY).code == 0
        run = only_run()
        assert cli("eval", str(run)).code == 0 and (run / "evals.jsonl").is_file()
        (run / "prerequisites.json").write_text("[]")
        shutil.move(str(run), root / "run")
        assert cli("sweep", "train", *TINY, "seed=0,1").code == 0
        shutil.move(str(next(Path("runs/sweeps").iterdir())), root / "sweep")
        shutil.rmtree("runs")
    finally:
        os.chdir(old)
    return root


def _damage(path: Path, kind: str) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if DAMAGES[kind] == "dir":
        path.mkdir()
    elif DAMAGES[kind] is not None:
        path.write_bytes(DAMAGES[kind])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("line", "name", "kind"), CASES, ids=[f"{c[0].split(' {')[0]}:{c[1]}:{c[2]}" for c in CASES])
def test_a_damaged_record_is_survived(originals: Path, line: str, name: str, kind: str) -> None:
    Path("runs/train").mkdir(parents=True)
    run, other, sweep = Path("runs/train/run"), Path("other"), Path("sweep")
    shutil.copytree(originals / "run", run)
    shutil.copytree(originals / "run", other)
    shutil.copytree(originals / "sweep", sweep)
    damaged = (sweep if name == "sweep.json" else run) / name
    _damage(damaged, kind)
    before = _snapshot(damaged.parent)
    args = line.replace("{run}", str(run)).replace("{other}", str(other)).replace("{sweep}", str(sweep)).split()
    r = cli(*args)
    assert "Traceback" not in r.text, r.text
    assert r.code in (0, 2), (r.code, r.text)
    if r.code == 2:
        lines = [x for x in r.err.strip().splitlines() if x.startswith("modrun: ")]
        errors = [x for x in lines if x.startswith("modrun: error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], r.err
        assert _snapshot(damaged.parent) == before, "a refused command changed the folder"


def test_the_scan_covers_every_damage_of_every_reader() -> None:
    assert len(CASES) == sum(len(names) for _, names in READERS) * len(DAMAGES) >= 150
