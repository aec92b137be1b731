"""Hardening (issue #15.16): bad data is found before any work: exit 2 naming the file or the class, no run folder.
The tests write their own tiny image folders (Pillow) and fake CIFAR-10 binary batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import cli

TRAIN = ["trainer.epochs=1", "model.width=4", "trainer.progress=false", "data.num_workers=0"]


def _images(root: Path, counts: dict[str, int]) -> Path:
    from PIL import Image

    rng = np.random.RandomState(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.randint(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _no_run_folder() -> bool:
    runs = Path("runs")
    return not runs.exists() or not any(p.name == "status.json" for p in runs.rglob("*"))


def _refused(*args: str) -> str:
    r = cli("train", *TRAIN, *args)
    assert r.code == 2 and "Traceback" not in r.text, r.text
    assert all(line.startswith("modrun: error: ") for line in r.err.strip().splitlines()), r.err
    assert _no_run_folder()
    return r.err


FOLDER = ["data=image_folder", "data.path=imgs", "data.num_classes=2", "data.image_size=8"]


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda root: (root / "b" / "empty.png").write_bytes(b""), "imgs/b/empty.png is empty (0 bytes)"),
        (lambda root: (root / "a" / "bad.png").write_bytes(b"not a png"), "imgs/a/bad.png is not a readable image"),
        (lambda root: (root / "c").mkdir(), "class 'c'"),
    ],
    ids=["zero-byte", "corrupt", "class-without-images"],
)
def test_bad_image_files_are_named_before_any_work(damage, named: str) -> None:
    damage(_images(Path("imgs"), {"a": 10, "b": 10}))
    assert named in _refused(*FOLDER)


def test_a_split_left_empty_by_small_classes_is_refused() -> None:
    _images(Path("imgs"), {"a": 4, "b": 4})  # 10% of 4 images rounds to none: no validation images at all
    err = _refused(*FOLDER)
    assert "the val split is empty" in err and "class 'a', 4 images" in err


def test_a_class_left_without_training_images_is_refused() -> None:
    _images(Path("imgs"), {"a": 10, "b": 10, "c": 2})  # c: one image to val, one to test
    err = _refused(
        *FOLDER[:-2], "data.num_classes=3", "data.image_size=8", "data.val_fraction=0.3", "data.test_fraction=0.3"
    )
    assert "class 'c' has 2 image(s), none left for training" in err


def test_train_val_folders_with_an_empty_val_are_refused() -> None:
    _images(Path("imgs") / "train", {"a": 6, "b": 6})
    (Path("imgs") / "val").mkdir()
    assert "imgs/val holds no images" in _refused(*FOLDER)


def _cifar(root: Path, bad_label: int | None) -> None:
    rng = np.random.RandomState(0)
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        records = rng.randint(0, 255, (8, 3073)).astype(np.uint8)
        records[:, 0] = np.arange(8) % 10
        if bad_label is not None and name == "data_batch_3":
            records[5, 0] = bad_label
        records.tofile(root / f"{name}.bin")


def test_cifar_label_out_of_range_is_named_before_any_work() -> None:
    args = ["data=cifar10", "data.root=cifar", "data.val_size=10", "data.batch_size=8"]
    _cifar(Path("cifar"), bad_label=12)
    err = _refused(*args)
    assert "cifar/data_batch_3.bin" in err and "first: 12 in record 5" in err
    _cifar(Path("cifar2"), bad_label=None)
    assert cli("train", *TRAIN, *args[:1], "data.root=cifar2", *args[2:]).code == 0  # the same, well made: runs
