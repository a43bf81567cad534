"""Small reference models that ship with secateurs (used by the demo and tests)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DigitsCNN", "SmallResNet"]


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


class _Basic(nn.Module):
    """A ResNet basic block: two 3x3 convs with BatchNorm, plus the input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (out + x).relu()


class SmallResNet(nn.Module):
    """A ResNet for single-channel digits (8x8 or 28x28): three stages of ``blocks`` residual blocks.

    Rebuildable from the spec ``secateurs.zoo:SmallResNet``; the layer-pruning benchmark uses it.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, blocks: int = 3) -> None:
        super().__init__()
        w = width

        def down(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.stem = down(1, w, 1)
        self.stage1 = nn.Sequential(*[_Basic(w) for _ in range(blocks)])
        self.down2 = down(w, 2 * w, 2)
        self.stage2 = nn.Sequential(*[_Basic(2 * w) for _ in range(blocks)])
        self.down3 = down(2 * w, 4 * w, 2)
        self.stage3 = nn.Sequential(*[_Basic(4 * w) for _ in range(blocks)])
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage1(self.stem(x))
        x = self.stage2(self.down2(x))
        x = self.stage3(self.down3(x))
        return self.head(x.mean((2, 3)))
