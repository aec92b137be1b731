"""Built-in datasets, declared lazily. Each builder returns a `modrun.components.data.base.Data` bundle."""

from modrun.core.registry import DATASETS

DATASETS.lazy(
    "digits",
    "modrun.components.data.builtin:digits",
    "scikit-learn's bundled 8x8 handwritten digits (1797 real images)",
)
DATASETS.lazy(
    "synthetic",
    "modrun.components.data.builtin:synthetic",
    "class-prototype images plus noise; shape, classes, size set",
)
DATASETS.lazy(
    "cifar10",
    "modrun.components.data.builtin:cifar10",
    "CIFAR-10 from the binary release (cifar-10-batches-bin) on disk",
)
DATASETS.lazy(
    "image_folder",
    "modrun.components.data.image_folder:image_folder",
    "images in PATH/<class>/ or PATH/{train,val}/<class>/",
)

DATASETS.lazy(
    "python_docs",
    "modrun.components.data.text:python_docs",
    "language modeling: CPython's bundled reference docs (pydoc_data, ~466 KB), byte-level",
)
DATASETS.lazy(
    "python_code",
    "modrun.components.data.text:python_code",
    "language modeling: the standard library's .py sources (up to data.max_bytes), byte-level",
)
DATASETS.lazy(
    "text_file",
    "modrun.components.data.text:text_file",
    "language modeling: a .txt/.jsonl file or folder of them (data.path), byte-level",
)

# data keys the runner itself reads; every other key of the data node is an argument of the dataset builder
RUNNER_KEYS = {
    *("name", "batch_size", "eval_batch_size", "num_workers", "augment", "channels", "num_classes"),
    *("prefetch_factor", "in_memory_mb", "task", "vocab_size"),
}
