"""Every model the command line can build, by name: one factory, :func:`build_model`.

* ``resnet20/32/44/56/110`` (and ``resnet8``, ``resnet14``: 6n+2 below 18): CIFAR ResNets of
  :mod:`s2h.models.cifar`, optional stage ``widths``;
* ``wrn28_10`` (:mod:`s2h.models.cifar`), ``vit_cifar`` / ``swin_cifar`` (:mod:`s2h.models.vit`);
* ``small_cnn_teacher``, ``small_cnn_student`` (alias ``small_cnn``) (:mod:`s2h.models.small_cnn`);
* any torchvision classification model (``resnet18``, ``resnet50``, ``mobilenet_v2``, ...), never
  with pretrained weights, adapted to the data: ``in_channels`` input channels, and for ResNets on
  small inputs (``image_size <= 64``) the usual CIFAR stem (3x3 stride-1 first conv, no max-pool),
  so 8x8 or 32x32 inputs are not reduced to nothing before the first block.

* ``timm:NAME``: any timm model (``timm:resnet50``, ``timm:vit_tiny_patch16_224``, ...), built with
  ``pretrained=False`` (nothing is downloaded), ``num_classes`` and ``in_chans``; ViT-like models
  get ``img_size=image_size`` when given.

What a run saved (``spec`` of a one-shot model, the ``--model`` of a prune run) is rebuilt with
the same call.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from . import cifar, vit
from .small_cnn import SMALL_CNNS

__all__ = ["build_model", "CIFAR_RESNET_DEPTHS"]

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)


def _cifar_resnet_depth(key: str) -> int | None:
    if not (key.startswith("resnet") and key[6:].isdigit()):
        return None
    d = int(key[6:])
    return d if d in CIFAR_RESNET_DEPTHS or (d < 18 and (d - 2) % 6 == 0) else None


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


def _build_timm(name: str, num_classes: int, in_channels: int, image_size: int | None) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        raise ImportError(f"build_model: 'timm:{name}' needs timm: pip install timm") from e
    if name not in timm.list_models():
        raise ValueError(f"build_model: unknown timm model {name!r} (see timm.list_models())")
    kwargs = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
    if image_size is not None:
        try:  # ViT/DeiT/Swin take the input size; CNNs do not need it
            return timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError:
            pass
    return timm.create_model(name, **kwargs)


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int | None = None,
                widths: Sequence[int] | None = None) -> nn.Module:
    """A freshly initialised model by name (see the module docstring for the names).

    Args:
        name: the architecture.
        num_classes: outputs of the classifier.
        in_channels: input channels (1 for digits).
        image_size: input side; torchvision ResNets get a CIFAR stem when it is 64 or less, ViT and
            Swin are built for it (default 32).
        widths: stage widths of a CIFAR ResNet (default 16, 32, 64).
    """
    if num_classes < 1:
        raise ValueError(f"build_model: num_classes must be positive, got {num_classes}")
    if name.lower().startswith("timm:"):
        return _build_timm(name[5:], num_classes, in_channels, image_size)
    key = name.lower()
    depth = _cifar_resnet_depth(key)
    if depth is not None:
        net = cifar.CifarResNet(depth, num_classes, widths=tuple(widths) if widths else (16, 32, 64))
        if in_channels != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(in_channels, old.out_channels, 3, 1, 1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        return net
    if key in SMALL_CNNS:
        return SMALL_CNNS[key](num_classes=num_classes, in_channels=in_channels)
    if key == "wrn28_10":  # 3x3 stem, 32x32 input
        return _adapt_torchvision(cifar.wrn28_10(num_classes=num_classes), in_channels, None)
    if key in ("vit_cifar", "swin_cifar"):  # patch 4, 32x32 input by default
        return getattr(vit, key)(num_classes=num_classes, in_channels=in_channels, image_size=image_size or 32)
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if key not in known:
        raise ValueError(f"build_model: unknown model {name!r}; use a CIFAR ResNet (resnet20/32/44/56/110), "
                         f"{', '.join(sorted(SMALL_CNNS))}, wrn28_10, vit_cifar, swin_cifar or a torchvision "
                         "classification model (e.g. resnet18, resnet50, mobilenet_v2)")
    model = torchvision.models.get_model(key, weights=None, num_classes=num_classes)
    return _adapt_torchvision(model, in_channels, image_size)
