"""Built-in models, declared lazily so that listing them does not import torch.

Every model factory takes the input shape and class count from the data config (`in_channels`,
`num_classes`, and `image_size` where the architecture needs it) plus its own arguments.
"""

from modrun.core.registry import MODELS

MODELS.lazy(
    "mlp", "modrun.components.models.mlp:mlp", "multilayer perceptron on flattened images (hidden sizes as a list)"
)
MODELS.lazy(
    "cnn_small", "modrun.components.models.cnn:cnn_small", "3-conv CNN with BN for small images such as 8x8 digits"
)
MODELS.lazy(
    "resnet",
    "modrun.components.models.resnet:resnet",
    "CIFAR-style ResNet of any depth 6n+2 (model.depth), width multiplier",
)
for _depth in (20, 32, 56, 110):
    MODELS.lazy(
        f"resnet{_depth}",
        f"modrun.components.models.resnet:resnet{_depth}",
        f"CIFAR-style ResNet-{_depth} (He et al. 2016), 3 stages, width multiplier",
    )
MODELS.lazy(
    "gpt",
    "modrun.components.models.gpt:GPT",
    "decoder-only transformer LM (GPT-2 layout; n_layer, n_head, n_embd, learned or rotary positions)",
)
MODELS.lazy("vit", "modrun.components.models.vit:ViT", "vision transformer for small images (patch, depth, heads, dim)")

MODELS.lazy(
    "hf",
    "modrun.components.models.hf:hf",
    "a local Hugging Face causal LM folder (model.path) or config (model.arch); extra modrun[hf]",
)

# the task each built-in model serves (the data must declare the same); a model of one's own declares it as an
# attribute of its factory (`my_lm.task = "language_modeling"`), or is not checked
MODEL_TASKS = {
    "gpt": "language_modeling",
    "hf": "language_modeling",
    **{name: "classification" for name in ("mlp", "cnn_small", "resnet", "resnet20", "resnet32", "resnet56", "vit")},
    "resnet110": "classification",
}
