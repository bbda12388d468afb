"""Small CNNs for the bundled digits dataset, and a model factory by name.

``small_cnn_teacher`` (~120k parameters) and ``small_cnn_student`` (~31k parameters) train in seconds on
8x8 digits on a CPU; they take any input size (global average pooling before the classifier).

:func:`build_model` also builds torchvision architectures by name (``resnet18``, ``resnet50``,
``mobilenet_v2``, ...), never with pretrained weights, adapted to the data: ``num_classes``
outputs, ``in_channels`` input channels, and for ResNets on small inputs (``image_size <= 64``)
the usual CIFAR stem (3x3 stride-1 first conv, no max-pool), so 8x8 or 32x32 inputs are not
reduced to nothing before the first block.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "small_cnn_teacher", "small_cnn_student", "build_model", "SMALL_CNNS"]


class SmallCNN(nn.Module):
    """conv-bn-relu x2, pool, conv-bn-relu, pool, conv-bn-relu, global avg pool, linear-relu-linear.

    All convs and linears are plain ``nn.Conv2d`` / ``nn.Linear`` (prunable; ``features.0`` is the
    first conv and ``classifier.2`` the classifier).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, int, int] = (16, 32, 64),
                 hidden: int = 64):
        super().__init__()
        w1, w2, w3 = widths

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, w1), *block(w1, w1), nn.MaxPool2d(2, ceil_mode=True),
            *block(w1, w2), nn.MaxPool2d(2, ceil_mode=True),
            *block(w2, w3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(w3, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def small_cnn_teacher(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, widths=(32, 64, 128), hidden=128)


def small_cnn_student(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, widths=(16, 32, 64), hidden=64)


SMALL_CNNS = {"small_cnn": small_cnn_student, "small_cnn_student": small_cnn_student,
              "small_cnn_teacher": small_cnn_teacher}


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _adapt_torchvision(model: nn.Module, in_channels: int, image_size: int | None) -> nn.Module:
    is_resnet = isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")
    if is_resnet and image_size is not None and image_size <= 64:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    if in_channels != 3:
        first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise ValueError("build_model: the model has no Conv2d whose input channels could be adapted")
        n, m = first
        _replace_module(model, n, nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                            m.dilation, m.groups, m.bias is not None, m.padding_mode))
    return model


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int | None = None) -> nn.Module:
    """A freshly initialised model by name: a small CNN or a torchvision architecture.

    Args:
        name: ``small_cnn_teacher``, ``small_cnn_student`` (alias ``small_cnn``), ``resnet56`` or
            ``wrn28_10`` (:mod:`s2h.models.cifar`), ``vit_cifar`` or ``swin_cifar`` (:mod:`s2h.models.vit`),
            or any name ``torchvision.models.list_models()``
            knows (no pretrained weights are loaded).
        num_classes: outputs of the classifier.
        in_channels: input channels (1 for digits).
        image_size: input side; ResNets get a CIFAR stem when it is 64 or less.
    """
    if num_classes < 1:
        raise ValueError(f"build_model: num_classes must be positive, got {num_classes}")
    key = name.lower()
    if key in SMALL_CNNS:
        return SMALL_CNNS[key](num_classes=num_classes, in_channels=in_channels)
    if key in ("resnet56", "wrn28_10"):  # CIFAR networks of s2h.models.cifar (3x3 stem, 32x32 input)
        from . import cifar

        return _adapt_torchvision(getattr(cifar, key)(num_classes=num_classes), in_channels, None)
    if key in ("vit_cifar", "swin_cifar"):  # Transformers of s2h.models.vit (patch 4, 32x32 input by default)
        from . import vit

        return getattr(vit, key)(num_classes=num_classes, in_channels=in_channels, image_size=image_size or 32)
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if key not in known:
        raise ValueError(f"build_model: unknown model {name!r}; use one of {sorted(SMALL_CNNS)}, resnet56, wrn28_10, "
                         "vit_cifar, swin_cifar or a torchvision classification model (e.g. resnet18, resnet50, "
                         "mobilenet_v2)")
    model = torchvision.models.get_model(key, weights=None, num_classes=num_classes)
    return _adapt_torchvision(model, in_channels, image_size)
