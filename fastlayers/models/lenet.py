"""LeNet-5 (LeCun et al. 1998) with ReLU and max pooling, as usually trained on MNIST."""
import torch.nn as tnn

from ._layers import get_layers


class LeNet5(tnn.Module):
    """conv5(6) -> pool -> conv5(16) -> pool -> fc120 -> fc84 -> fc(num_classes).

    The classic network takes 32x32 images; 28x28 MNIST digits get padding=2 on conv1
    so that the feature maps are the same (28 -> 14 -> 10 -> 5). Other sizes work too:
    the first Linear is sized from `image_size`.
    """

    def __init__(self, num_classes=10, in_channels=1, layers="fastlayers", image_size=28):
        super().__init__()
        L = get_layers(layers)
        pad = 2 if image_size < 32 else 0
        s = image_size + 2 * pad - 4      # conv1 5x5
        s = s // 2                        # pool
        s = s - 4                         # conv2 5x5
        s = s // 2                        # pool
        if s < 1:
            raise ValueError(f"LeNet5 needs images of at least 12x12 pixels, got {image_size}")
        self.features = tnn.Sequential(
            L.Conv2d(in_channels, 6, 5, padding=pad), tnn.ReLU(inplace=True), L.MaxPool2d(2),
            L.Conv2d(6, 16, 5), tnn.ReLU(inplace=True), L.MaxPool2d(2),
        )
        self.classifier = tnn.Sequential(
            tnn.Flatten(),
            L.Linear(16 * s * s, 120), tnn.ReLU(inplace=True),
            L.Linear(120, 84), tnn.ReLU(inplace=True),
            L.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def lenet5(num_classes=10, in_channels=1, layers="fastlayers", image_size=28, **kw):
    if kw:
        raise TypeError(f"lenet5: unexpected arguments {sorted(kw)}")
    return LeNet5(num_classes, in_channels, layers, image_size)
