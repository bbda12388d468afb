"""Model definitions used in the papers' experiments (CIFAR-style networks take 32x32 input), and
:func:`build_model`, the one factory by name."""
from .cifar import CifarResNet, WideResNet, resnet56, wrn28_10
from .registry import build_model
from .small_cnn import SmallCNN, small_cnn_student, small_cnn_teacher
from .vit import SwinTransformer, VisionTransformer, swin_cifar, vit_cifar
from .wrappers import SelectOutput

__all__ = [
    "CifarResNet", "WideResNet", "resnet56", "wrn28_10",
    "SmallCNN", "SelectOutput", "build_model", "small_cnn_student", "small_cnn_teacher",
    "VisionTransformer", "SwinTransformer", "vit_cifar", "swin_cifar",
]
