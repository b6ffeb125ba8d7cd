"""ResNet-18/34 (He et al. 2015) with BasicBlock; keys match torchvision's resnet*.

ImageNet stem: conv7x7/2 + maxpool3x3/2. Small-image stem (`small_input=True`,
default when `image_size` <= 64): conv3x3/1 and no max-pool, as used for CIFAR/MNIST.
"""
import torch.nn as tnn

from ._layers import get_layers


class BasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, L, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = L.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = L.BatchNorm2d(planes)
        self.relu = tnn.ReLU(inplace=True)
        self.conv2 = L.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = L.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = tnn.Sequential(
                L.Conv2d(inplanes, planes, 1, stride=stride, bias=False), L.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(tnn.Module):
    def __init__(self, blocks, num_classes=10, in_channels=3, layers="fastlayers",
                 small_input=False):
        super().__init__()
        L = get_layers(layers)
        if small_input:
            self.conv1 = L.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = tnn.Identity()
        else:
            self.conv1 = L.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = L.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = L.BatchNorm2d(64)
        self.relu = tnn.ReLU(inplace=True)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stride = 1 if i == 0 else 2
            mods = []
            for j in range(n):
                mods.append(BasicBlock(L, inplanes, planes, stride if j == 0 else 1))
                inplanes = planes
            setattr(self, f"layer{i + 1}", tnn.Sequential(*mods))
        self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
        self.fc = L.Linear(512, num_classes)
        for m in self.modules():  # torchvision's init
            if isinstance(m, tnn.Conv2d):
                tnn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, tnn.BatchNorm2d):
                tnn.init.ones_(m.weight)
                tnn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _small(small_input, image_size):
    if small_input is None:
        return image_size is not None and image_size <= 64
    return small_input


def resnet18(num_classes=10, in_channels=1, layers="fastlayers", image_size=None,
             small_input=None):
    return ResNet((2, 2, 2, 2), num_classes, in_channels, layers, _small(small_input, image_size))


def resnet34(num_classes=10, in_channels=1, layers="fastlayers", image_size=None,
             small_input=None):
    return ResNet((3, 4, 6, 3), num_classes, in_channels, layers, _small(small_input, image_size))
