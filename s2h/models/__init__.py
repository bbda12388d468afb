"""Model definitions used in the papers' experiments (CIFAR-style networks take 32x32 input)."""
from .cifar import CifarResNet, WideResNet, resnet56, wrn28_10
from .small_cnn import SmallCNN, build_model, small_cnn_student, small_cnn_teacher  # noqa: F401
from .vit import SwinTransformer, VisionTransformer, swin_cifar, vit_cifar

__all__ = [
    "CifarResNet", "WideResNet", "resnet56", "wrn28_10",
    "SmallCNN", "build_model", "small_cnn_student", "small_cnn_teacher",
    "VisionTransformer", "SwinTransformer", "vit_cifar", "swin_cifar",
]
