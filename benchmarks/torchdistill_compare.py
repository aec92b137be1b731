r"""modrun against torchdistill 1.1.5 on the same Hinton KD task, in one process (a benchmark, not a test).

The task: resnet56 teaches resnet20 (modrun's own model definitions, used by both sides, same initial weights),
loss = cross-entropy + 1.0 * KD (temperature 4), SGD lr 0.05 momentum 0.9 Nesterov wd 5e-4, cosine decay per
step, batch 128, synthetic 32x32 3-channel images with 10 classes (modrun.components.data.builtin.synthetic), same
epochs. torchdistill drives its own DistillationBox (its DataLoader, WeightedSumLoss + KDLoss, its optimiser
and scheduler set up from a config dict); modrun runs modrun.engine.loop.fit with DistillObjective, cache off and on, as
benchmarks/distill_speed.py does. Both teachers are in eval mode (torchdistill leaves that to its caller).
Only the training loops are timed (model and box construction excluded); the two sides alternate over
--repeats and the best time of each is kept. The target is modrun >= 1.3x torchdistill's samples/s.

torchdistill is not a dependency of modrun; give it its own virtual environment (pip must not replace torch),
from the repository root:

    python3.11 -m venv /tmp/td2
    /tmp/td2/bin/pip install torch==2.14.1 torchvision==0.29.1 torchdistill==1.1.5
    printf 'torch==2.14.1\ntorchvision==0.29.1\n' > /tmp/td2_constraints.txt
    /tmp/td2/bin/pip install -c /tmp/td2_constraints.txt hydra-core omegaconf typer rich scikit-learn safetensors pillow
    /tmp/td2/bin/pip install --no-deps -e .
    /tmp/td2/bin/python benchmarks/torchdistill_compare.py [--epochs 4] [--size 1024] [--repeats 3] [--device cpu]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset, RandomSampler

from modrun.components.data.base import Data, Preprocess, batches
from modrun.components.data.builtin import synthetic
from modrun.core.registry import MODELS
from modrun.engine.loop import fit
from modrun.methods.distill.objective import DistillObjective

sys.path.insert(0, str(Path(__file__).parent))
from distill_speed import config as modrun_config  # noqa: E402  (the same modrun side as distill_speed.py)

TEMPERATURE = 4.0
KD_WEIGHT = 1.0
SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}


class NormalizedImages(Dataset):
    """(image, label) pairs over in-memory tensors that are already normalised, as torchdistill expects."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def models(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student, teacher), both built from modrun's registry with the same seed on every call."""
    torch.manual_seed(0)
    teacher = MODELS.get(args.teacher)(in_channels=3, num_classes=10).to(device).eval().requires_grad_(False)
    return MODELS.get(args.student)(in_channels=3, num_classes=10).to(device), teacher


def steps(args: argparse.Namespace, data: Data) -> int:
    return args.epochs * -(-len(data.train) // args.batch_size)


# ---------------------------------------------------------------------------------------------------- modrun


def modrun_run(args: argparse.Namespace, data: Data, device: torch.device, cache: bool = False) -> float:
    """Seconds of fit(): training, validation after each epoch, best/last checkpoints, final test evaluation.
    With `cache`, the teacher's outputs of the first epoch are reused afterwards (kd.cache_teacher=true)."""
    student, teacher = models(args, device)
    cfg = modrun_config(args, cache)
    with tempfile.TemporaryDirectory() as tmp:
        objective = DistillObjective(student, [teacher], cfg.kd, data, device, Path(tmp))
        t0 = time.perf_counter()
        fit(cfg, Path(tmp), objective, data, device, resume=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- torchdistill


def torchdistill_config(args: argparse.Namespace, data: Data) -> dict:
    """A train config for torchdistill's DistillationBox: KDLoss (alpha = beta = 1, so CE + T^2 KL) as the one
    weighted term, the teacher frozen, SGD and a per-step cosine schedule."""
    kd_loss = {
        "key": "KDLoss",
        "kwargs": {
            "student_module_path": ".",
            "student_module_io": "output",
            "teacher_module_path": ".",
            "teacher_module_io": "output",
            "temperature": TEMPERATURE,
            "alpha": 1.0,
            "beta": 1.0,
            "reduction": "batchmean",
        },
    }
    return {
        "num_epochs": args.epochs,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": RandomSampler, "kwargs": {"generator": torch.Generator().manual_seed(0)}},
            "kwargs": {"batch_size": args.batch_size, "num_workers": 0, "drop_last": False},
        },
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": dict(SGD)},
        "scheduler": {"key": "CosineAnnealingLR", "kwargs": {"T_max": steps(args, data)}, "scheduling_step": 1},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": kd_loss, "weight": KD_WEIGHT}}},
        },
    }


def torchdistill_box(args: argparse.Namespace, data: Data, train_x: torch.Tensor, device: torch.device):
    from torchdistill.core.distillation import get_distillation_box

    student, teacher = models(args, device)
    datasets = {"train": NormalizedImages(train_x, data.train.y)}
    config = torchdistill_config(args, data)
    return get_distillation_box(teacher, student, datasets, config, device, None, False, 1.0)


def torchdistill_run(args: argparse.Namespace, data: Data, train_x: torch.Tensor, device: torch.device) -> float:
    """Seconds of the epoch loop of torchdistill's image_classification example (training only, no evaluation)."""
    box = torchdistill_box(args, data, train_x, device)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
        box.post_epoch_process()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------- sanity checks


def first_batch_losses(args: argparse.Namespace, data: Data, train_x: torch.Tensor, device: torch.device) -> dict:
    """Both losses on the same batch from the same initial weights: the two sides compute the same objective."""
    n = min(args.batch_size, len(data.train))
    x, y = train_x[:n], data.train.y[:n]
    box = torchdistill_box(args, data, train_x, device)
    box.pre_epoch_process(epoch=0)
    td = box.forward_process(x, y, {}).item()
    student, teacher = models(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        objective = DistillObjective(student, [teacher], modrun_config(args, cache=False).kd, data, device, Path(tmp))
        student.train()
        ours = objective.loss(x, y, torch.arange(n, device=device))[0].item()
    return {"torchdistill": round(td, 6), "modrun": round(ours, 6)}


def loader_seconds(args: argparse.Namespace, data: Data, train_x: torch.Tensor, device: torch.device) -> dict:
    """One epoch of batches alone (no model), per framework: what each data path costs by itself."""
    loader = torchdistill_box(args, data, train_x, device).train_data_loader
    t0 = time.perf_counter()
    for sample_batch, targets, _ in loader:
        sample_batch, targets = sample_batch.to(device), targets.to(device)
    td = time.perf_counter() - t0
    prep = Preprocess(data, device)
    t0 = time.perf_counter()
    for x, _, _ in batches(data.train, args.batch_size, seed=0, epoch=0, shuffle=True):
        prep(x)
    return {"torchdistill": round(td, 4), "modrun": round(time.perf_counter() - t0, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.WARNING)  # torchdistill logs its setup to the root logger
    import torchdistill

    device = torch.device(args.device)
    data = synthetic(size=args.size, val_size=32, test_size=32, image_size=32).to(device)
    # torchdistill reads samples already normalised with modrun's train-split statistics; modrun normalises
    # each batch itself (Preprocess), so the same values reach both models
    train_x = Preprocess(data, device)(data.train.x).contiguous()
    samples = args.epochs * len(data.train)
    losses = first_batch_losses(args, data, train_x, device)
    loaders = loader_seconds(args, data, train_x, device)
    td_times, ours, cached = [], [], []
    for _ in range(args.repeats):
        td_times.append(torchdistill_run(args, data, train_x, device))
        ours.append(modrun_run(args, data, device))
        cached.append(modrun_run(args, data, device, cache=True))
    report = {
        "benchmark": "torchdistill_compare",
        "torch": torch.__version__,
        "torchdistill": torchdistill.__version__,
        "teacher": args.teacher,
        "student": args.student,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "samples": samples,
        "repeats": args.repeats,
        "torchdistill_seconds": [round(t, 3) for t in td_times],
        "modrun_seconds": [round(t, 3) for t in ours],
        "torchdistill_samples_per_s": round(samples / min(td_times), 1),
        "modrun_samples_per_s": round(samples / min(ours), 1),
        "modrun_cache_seconds": [round(t, 3) for t in cached],
        "modrun_cache_samples_per_s": round(samples / min(cached), 1),
        "ratio": round(min(td_times) / min(ours), 3),
        "ratio_with_teacher_cache": round(min(td_times) / min(cached), 3),
        "target": 1.3,
        "first_batch_loss": losses,
        "one_epoch_data_only_seconds": loaders,
        "note": (
            "same process, torch, models, initial weights, data, batch size, epochs and loss, teacher in eval "
            "mode on both sides; "
            "torchdistill: DistillationBox epoch loop only (its DataLoader over pre-normalised tensors, "
            "per-sample indexing + default collate, io-dict bookkeeping, KDLoss, SGD, per-step cosine), "
            "no evaluation or checkpoints; modrun: all of fit() (per-batch normalisation, validation on 32 "
            "samples after every epoch, best/last checkpoints, metrics.jsonl, final test evaluation on 32 samples)"
        ),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
