import numpy as np
import pytest
import torch

from modrun.components.data.base import Data, Preprocess, Split, batches, epoch_order
from modrun.components.data.builtin import cifar10, digits, synthetic
from modrun.components.data.image_folder import image_folder
from modrun.core.errors import UserError
from modrun.core.registry import MODELS


@pytest.mark.parametrize("name", ["mlp", "cnn_small", "resnet20", "resnet32"])
@pytest.mark.parametrize("size", [8, 32])
def test_models_take_shape_from_data(name, size):
    kwargs = {"in_channels": 3, "num_classes": 7}
    if name == "mlp":
        kwargs["image_size"] = size
    model = MODELS.get(name)(**kwargs)
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 7)


def test_resnet_depths_and_width():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    r20, r56 = MODELS.get("resnet20")(3, 10), MODELS.get("resnet56")(3, 10)
    assert 0.26e6 < count(r20) < 0.30e6  # He et al. report 0.27M for ResNet-20
    assert 0.84e6 < count(r56) < 0.90e6  # and 0.85M for ResNet-56
    assert count(MODELS.get("resnet20")(3, 10, width=2.0)) > 3.5 * count(r20)
    assert [n for n, _ in r20.layers.named_children()] == ["0", "1", "2"]


def test_digits_split_is_stratified_and_fixed():
    d = digits()
    assert (len(d.train), len(d.val), len(d.test)) == (1259, 179, 359)
    assert torch.bincount(d.test.y).min() >= 35  # every class present in proportion
    assert torch.equal(digits().test.y, d.test.y)
    assert d.train.x.min() >= 0 and d.train.x.max() <= 1
    up = digits(image_size=16)
    assert up.train.x.shape[1:] == (1, 16, 16) and up.image_size == 16


def test_synthetic_shape_and_determinism():
    a, b = synthetic(size=64, val_size=8, test_size=8, image_size=12, channels=2, num_classes=3), None
    b = synthetic(size=64, val_size=8, test_size=8, image_size=12, channels=2, num_classes=3)
    assert a.train.x.shape == (64, 2, 12, 12) and a.num_classes == 3
    assert torch.equal(a.train.x, b.train.x)


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert torch.equal(epoch_order(100, 3, 5, True), epoch_order(100, 3, 5, True))
    assert not torch.equal(epoch_order(100, 3, 5, True), epoch_order(100, 3, 6, True))
    split = Split(y=torch.arange(10), x=torch.arange(10).float().view(10, 1, 1, 1))
    full = [y.tolist() for _, y, _ in batches(split, 3, seed=1, epoch=0, shuffle=True)]
    resumed = [y.tolist() for _, y, _ in batches(split, 3, seed=1, epoch=0, shuffle=True, start=2)]
    assert resumed == full[2:]


def test_augmentation_is_seeded():
    data = Data(Split(y=torch.zeros(1)), Split(y=torch.zeros(1)), Split(y=torch.zeros(1)), 3, 8, 2)
    prep = Preprocess(data, torch.device("cpu"), crop_padding=2, hflip=True)
    x = torch.rand(16, 3, 8, 8)
    assert torch.equal(prep(x, augment_seed=4), prep(x, augment_seed=4))
    assert not torch.equal(prep(x, augment_seed=4), prep(x, augment_seed=5))
    assert torch.equal(prep(x), x)  # no seed: no augmentation (evaluation)


def _write_images(root, classes=("cat", "dog", "owl"), per_class=6, size=10):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_split_by_fraction(tmp_path):
    _write_images(tmp_path / "imgs")
    d = image_folder(str(tmp_path / "imgs"), image_size=8, val_fraction=0.2, test_fraction=0.2)
    assert d.num_classes == 3 and len(d.train) + len(d.val) + len(d.test) == 18
    x, y, _ = next(batches(d.train, 4, num_workers=0))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.uint8


def test_image_folder_with_train_val_folders(tmp_path):
    _write_images(tmp_path / "ds" / "train")
    _write_images(tmp_path / "ds" / "val", per_class=2)
    d = image_folder(str(tmp_path / "ds"), image_size=8, channels=1)
    assert (len(d.train), len(d.val), d.channels) == (18, 6, 1)
    with pytest.raises(UserError, match="not a directory"):
        image_folder(str(tmp_path / "nope"))


def test_cifar10_binary_reader(tmp_path):
    base = tmp_path / "cifar-10-batches-bin"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        records = rng.integers(0, 255, (20, 3073), dtype=np.uint8)
        records[:, 0] = np.arange(20) % 10
        records.tofile(base / f"{name}.bin")
    d = cifar10(str(tmp_path), val_size=20)
    assert (len(d.train), len(d.val), len(d.test)) == (80, 20, 20)
    assert d.train.x.dtype == torch.uint8 and d.train.x.shape[1:] == (3, 32, 32)
    with pytest.raises(UserError, match="no CIFAR-10 binary batches"):
        cifar10(str(tmp_path / "elsewhere"))
