"""AlexNet (Krizhevsky et al. 2012, single-tower layout as in torchvision) and a
small-image variant for 28-32 px inputs."""
import torch.nn as tnn

from ._layers import get_layers


class AlexNet(tnn.Module):
    """224x224 AlexNet; state_dict keys match torchvision's alexnet."""

    def __init__(self, num_classes=10, in_channels=3, layers="fastlayers", dropout=0.5):
        super().__init__()
        L = get_layers(layers)
        self.features = tnn.Sequential(
            L.Conv2d(in_channels, 64, 11, stride=4, padding=2), tnn.ReLU(inplace=True),
            L.MaxPool2d(3, 2),
            L.Conv2d(64, 192, 5, padding=2), tnn.ReLU(inplace=True),
            L.MaxPool2d(3, 2),
            L.Conv2d(192, 384, 3, padding=1), tnn.ReLU(inplace=True),
            L.Conv2d(384, 256, 3, padding=1), tnn.ReLU(inplace=True),
            L.Conv2d(256, 256, 3, padding=1), tnn.ReLU(inplace=True),
            L.MaxPool2d(3, 2),
        )
        self.avgpool = tnn.AdaptiveAvgPool2d((6, 6))
        self.classifier = tnn.Sequential(
            tnn.Dropout(dropout), L.Linear(256 * 6 * 6, 4096), tnn.ReLU(inplace=True),
            tnn.Dropout(dropout), L.Linear(4096, 4096), tnn.ReLU(inplace=True),
            L.Linear(4096, num_classes),
        )

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


class AlexNetSmall(tnn.Module):
    """AlexNet for 28-32 px images: 3x3 convs, three 2x2 pools (28 -> 14 -> 7 -> 3,
    32 -> 16 -> 8 -> 4), 1024-wide classifier."""

    def __init__(self, num_classes=10, in_channels=1, layers="fastlayers", dropout=0.5):
        super().__init__()
        L = get_layers(layers)
        self.features = tnn.Sequential(
            L.Conv2d(in_channels, 64, 3, padding=1), tnn.ReLU(inplace=True), L.MaxPool2d(2),
            L.Conv2d(64, 192, 3, padding=1), tnn.ReLU(inplace=True), L.MaxPool2d(2),
            L.Conv2d(192, 384, 3, padding=1), tnn.ReLU(inplace=True),
            L.Conv2d(384, 256, 3, padding=1), tnn.ReLU(inplace=True),
            L.Conv2d(256, 256, 3, padding=1), tnn.ReLU(inplace=True),
            L.MaxPool2d(2),
        )
        self.avgpool = tnn.AdaptiveAvgPool2d((3, 3))
        self.classifier = tnn.Sequential(
            tnn.Dropout(dropout), L.Linear(256 * 3 * 3, 1024), tnn.ReLU(inplace=True),
            tnn.Dropout(dropout), L.Linear(1024, 1024), tnn.ReLU(inplace=True),
            L.Linear(1024, num_classes),
        )

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


def alexnet(num_classes=10, in_channels=1, layers="fastlayers", image_size=None, **kw):
    """The 224x224 AlexNet (works from 63x63 up). `image_size` is accepted for the
    registry's sake; use `alexnet_small` for 28-32 px images."""
    return AlexNet(num_classes, in_channels, layers, **kw)


def alexnet_small(num_classes=10, in_channels=1, layers="fastlayers", image_size=None, **kw):
    return AlexNetSmall(num_classes, in_channels, layers, **kw)
