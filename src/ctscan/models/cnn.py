"""Small CNNs for 1-channel CT slices: the predecessor's baseline and a GAP variant."""

from __future__ import annotations

import torch
from torch import nn


def _features(widths: tuple[int, ...]) -> nn.Sequential:
    """From 1 gray channel, per width: Conv3x3 -> BN -> ReLU -> MaxPool2 (halves the side)."""
    return nn.Sequential(
        *(
            nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )
            for c_in, c_out in zip((1, *widths), widths, strict=False)
        )
    )


class BaselineCNN(nn.Module):
    """The predecessor's baseline: 4 conv blocks (32/64/128/256), flatten -> 512 -> classes.

    The flatten head is sized for `image_size` (25.7M of its 26.1M parameters at 224 px).
    """

    WIDTHS = (32, 64, 128, 256)

    def __init__(self, num_classes: int = 4, image_size: int = 224, dropout: float = 0.3) -> None:
        super().__init__()
        if image_size < 16:
            raise ValueError(f"cnn needs image_size >= 16 (4 poolings), got {image_size}.")
        self.image_size = image_size
        side = image_size // 16
        self.features = _features(self.WIDTHS)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(self.WIDTHS[-1] * side * side, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images (B, C, image_size, image_size)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"cnn was built for {self.image_size} px inputs, got {tuple(x.shape[-2:])}; "
                "build it with the store's image size."
            )
        return self.head(self.features(x))


class GapCNN(nn.Module):
    """The baseline's conv blocks, 5 of them (32..512), with a global-average-pooling head.

    1.6M parameters whatever the input size (>= 32 px).
    """

    WIDTHS = (32, 64, 128, 256, 512)

    def __init__(self, num_classes: int = 4, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = _features(self.WIDTHS)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.WIDTHS[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images (B, C, H, W), H and W >= 32."""
        return self.head(self.pool(self.features(x)))
