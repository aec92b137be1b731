"""The wheel: every package and the whole config tree (top-level conf/, shipped as modrun.conf), and a modrun
that runs from it, outside the checkout."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (so the build leaves nothing in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("modrun", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", str(src), "--no-deps", "--no-build-isolation", "-w", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (built,) = out.glob("modrun-*.whl")
    return built


def test_wheel_holds_every_package_and_the_config_tree(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = [p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "modrun").rglob("__init__.py")]
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert missing == [], f"packages missing from the wheel (add them to pyproject's packages): {missing}"
    configs = sorted(f"modrun/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml"))
    assert len(configs) > 50 and [c for c in configs if c not in names] == []
    assert not any(n.startswith("conf/") for n in names)  # under the package, not a top-level folder


def test_modrun_runs_from_the_wheel_outside_the_checkout(wheel: Path, tmp_path: Path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import modrun, sys; from modrun.cli import main; print(modrun.__file__, file=sys.stderr); main()"
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}  # the unpacked wheel comes before the editable install
    r = subprocess.run(
        [sys.executable, "-c", code, "train", "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(str(site / "modrun")), r.stderr  # the wheel's modrun, not the checkout's
    assert "name: cnn_small" in r.stdout and "runs_dir: runs" in r.stdout
    r = subprocess.run(
        [sys.executable, "-c", code, "validate", "distill", "kd=dkd"], cwd=tmp_path, env=env, text=True,
        capture_output=True,
    )  # fmt: skip
    assert r.returncode == 0 and "distill config is valid" in r.stderr, r.stderr
