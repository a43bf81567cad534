"""Small reference models that ship with secateurs (used by the demo and tests)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DigitsCNN"]


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 single-channel digits (scikit-learn's ``load_digits``).

    Rebuildable from the spec ``secateurs.zoo:DigitsCNN``.
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(4 * w, 4 * w),
            nn.ReLU(inplace=True),
            nn.Linear(4 * w, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
