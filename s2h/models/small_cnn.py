"""Small CNNs for the bundled digits dataset.

``small_cnn_teacher`` (~120k parameters) and ``small_cnn_student`` (~31k parameters) train in seconds on
8x8 digits on a CPU; they take any input size (global average pooling before the classifier).
Build any model by name with :func:`s2h.models.build_model`.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "small_cnn_teacher", "small_cnn_student", "SMALL_CNNS"]


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
