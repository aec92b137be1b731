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
