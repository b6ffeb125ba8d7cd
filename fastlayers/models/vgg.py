"""VGG (Simonyan & Zisserman 2014), configurations A (vgg11) and D (vgg16), with and
without BatchNorm. Keys match torchvision's vgg*. `small_input=True` (default when
`image_size` <= 64) drops the last max-pool and uses a 512-wide classifier on a 1x1
average pool, which suits 28-32 px images."""
import torch.nn as tnn

from ._layers import get_layers

CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}


class VGG(tnn.Module):
    def __init__(self, cfg, num_classes=10, in_channels=3, layers="fastlayers",
                 batch_norm=False, small_input=False, dropout=0.5):
        super().__init__()
        L = get_layers(layers)
        cfg = list(cfg)
        if small_input:
            cfg = cfg[:-1]  # 4 pools: 28 -> 14 -> 7 -> 3 -> 1, 32 -> 2
        mods, c = [], in_channels
        for v in cfg:
            if v == "M":
                mods.append(L.MaxPool2d(2, 2))
            else:
                mods.append(L.Conv2d(c, v, 3, padding=1))
                if batch_norm:
                    mods.append(L.BatchNorm2d(v))
                mods.append(tnn.ReLU(inplace=True))
                c = v
        self.features = tnn.Sequential(*mods)
        pool, hidden = ((1, 1), 512) if small_input else ((7, 7), 4096)
        self.avgpool = tnn.AdaptiveAvgPool2d(pool)
        self.classifier = tnn.Sequential(
            L.Linear(512 * pool[0] * pool[1], hidden), tnn.ReLU(inplace=True), tnn.Dropout(dropout),
            L.Linear(hidden, hidden), tnn.ReLU(inplace=True), tnn.Dropout(dropout),
            L.Linear(hidden, num_classes),
        )
        for m in self.modules():  # torchvision's init
            if isinstance(m, tnn.Conv2d):
                tnn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                tnn.init.zeros_(m.bias)
            elif isinstance(m, tnn.BatchNorm2d):
                tnn.init.ones_(m.weight)
                tnn.init.zeros_(m.bias)
            elif isinstance(m, tnn.Linear):
                tnn.init.normal_(m.weight, 0, 0.01)
                tnn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


def _small(small_input, image_size):
    if small_input is None:
        return image_size is not None and image_size <= 64
    return small_input


def _vgg(name, batch_norm):
    def build(num_classes=10, in_channels=1, layers="fastlayers", image_size=None,
              small_input=None, **kw):
        return VGG(CFGS[name], num_classes, in_channels, layers, batch_norm,
                   _small(small_input, image_size), **kw)
    build.__name__ = name + ("_bn" if batch_norm else "")
    build.__doc__ = f"{name.upper()}{' with BatchNorm' if batch_norm else ''}."
    return build


vgg11 = _vgg("vgg11", False)
vgg11_bn = _vgg("vgg11", True)
vgg16 = _vgg("vgg16", False)
vgg16_bn = _vgg("vgg16", True)
