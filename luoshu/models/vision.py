"""Image classifiers: MLP, LeNet-5, AlexNet, VGG-16 and ResNet-18/34/50, each from a small config.

Models take (batch, channels, height, width) float images (the MLP takes any shape and
flattens it) and return (batch, num_classes) logits. Parameter names follow torchvision
(`features`/`classifier` for AlexNet and VGG, `conv1`/`layer1..4`/`fc` for ResNet), so its
state dicts load with `load_state_dict` where the shapes agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from luoshu.core.errors import Error
from luoshu.nn import init
from luoshu.nn.conv import AdaptiveAvgPool2d, Conv2d, MaxPool2d
from luoshu.nn.layers import Dropout, Flatten, Linear, ReLU, Sequential, Tanh
from luoshu.nn.module import Module
from luoshu.nn.norm import BatchNorm2d


def _positive(config, *names: str) -> None:
    """Refuses non-positive (or non-integer) sizes, naming the config and the field."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise Error(f"{type(config).__name__}: {name} must be a positive int, found {value!r}")


def _dropout(config) -> None:
    if not 0.0 <= config.dropout < 1.0:
        raise Error(f"{type(config).__name__}: dropout must be in [0, 1), found {config.dropout}")


def _check_image(model: str, x, in_channels: int) -> None:
    if x.ndim != 4 or x.shape[1] not in (in_channels, None):
        raise Error(f"{model}: expected images (batch, {in_channels}, height, width), found shape {x.shape}")


# --- MLP ----------------------------------------------------------------------------------
@dataclass
class MLPConfig:
    """A multi-layer perceptron over flattened inputs: Linear-ReLU(-Dropout) per hidden width."""

    in_features: int = 784
    hidden: tuple[int, ...] = (256, 256)
    num_classes: int = 10
    dropout: float = 0.0

    def __post_init__(self):
        _positive(self, "in_features", "num_classes")
        self.hidden = tuple(self.hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in self.hidden):
            raise Error(f"MLPConfig: hidden must be positive ints, found {self.hidden}")
        _dropout(self)


class MLP(Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        layers, width = [Flatten()], config.in_features
        for h in config.hidden:
            layers += [Linear(width, h), ReLU()] + ([Dropout(config.dropout)] if config.dropout else [])
            width = h
        layers.append(Linear(width, config.num_classes))
        self.layers = Sequential(*layers)

    def forward(self, x):
        if x.ndim < 2:
            raise Error(f"MLP: expected (batch, ...) inputs, found shape {x.shape}")
        features = math.prod(x.shape[1:]) if None not in x.shape[1:] else None
        if features not in (self.config.in_features, None):
            raise Error(f"MLP: expected {self.config.in_features} features per sample, found shape {x.shape}")
        return self.layers(x)


# --- LeNet-5 ------------------------------------------------------------------------------
@dataclass
class LeNetConfig:
    """LeNet-5 (LeCun et al. 1998) with max pooling; sizes below 10 pad the second conv to fit."""

    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 28
    activation: str = "relu"  # or "tanh", as in the paper

    def __post_init__(self):
        _positive(self, "in_channels", "num_classes", "image_size")
        if self.image_size < 4:
            raise Error(f"LeNetConfig: image_size must be >= 4 (two 2x2 poolings), found {self.image_size}")
        if self.activation not in ("relu", "tanh"):
            raise Error(f"LeNetConfig: activation must be 'relu' or 'tanh', found {self.activation!r}")


class LeNet(Module):
    def __init__(self, config: LeNetConfig):
        super().__init__()
        self.config = config
        act = ReLU if config.activation == "relu" else Tanh
        size = config.image_size // 2  # after conv1 ('same') and the first pool
        pad2 = 0 if size >= 10 else 2  # 28x28 keeps the classic valid conv; 8x8 digits need padding
        size = (size + 2 * pad2 - 4) // 2
        self.features = Sequential(
            Conv2d(config.in_channels, 6, 5, padding=2), act(), MaxPool2d(2),
            Conv2d(6, 16, 5, padding=pad2), act(), MaxPool2d(2),
        )
        self.classifier = Sequential(
            Flatten(), Linear(16 * size * size, 120), act(), Linear(120, 84), act(), Linear(84, config.num_classes))

    def forward(self, x):
        _check_image("LeNet", x, self.config.in_channels)
        if x.shape[2] not in (self.config.image_size, None) or x.shape[3] not in (self.config.image_size, None):
            raise Error(f"LeNet: expected {self.config.image_size}x{self.config.image_size} images, "
                        f"found shape {x.shape}")
        return self.classifier(self.features(x))


# --- AlexNet ------------------------------------------------------------------------------
@dataclass
class AlexNetConfig:
    """AlexNet (torchvision's single-tower layout) for image_size >= 64; smaller images (CIFAR)
    get 3x3 convolutions with stride 1 and a 2x2 final pooling, the common CIFAR variant."""

    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    hidden: int = 4096
    dropout: float = 0.5

    def __post_init__(self):
        _positive(self, "num_classes", "in_channels", "image_size", "hidden")
        if self.image_size < 8:
            raise Error(f"AlexNetConfig: image_size must be >= 8, found {self.image_size}")
        _dropout(self)


class AlexNet(Module):
    def __init__(self, config: AlexNetConfig):
        super().__init__()
        self.config = config
        c = config.in_channels
        if config.image_size >= 64:
            self.features = Sequential(
                Conv2d(c, 64, 11, stride=4, padding=2), ReLU(), MaxPool2d(3, 2),
                Conv2d(64, 192, 5, padding=2), ReLU(), MaxPool2d(3, 2),
                Conv2d(192, 384, 3, padding=1), ReLU(), Conv2d(384, 256, 3, padding=1), ReLU(),
                Conv2d(256, 256, 3, padding=1), ReLU(), MaxPool2d(3, 2))
            pool = 6
        else:
            self.features = Sequential(
                Conv2d(c, 64, 3, padding=1), ReLU(), MaxPool2d(2),
                Conv2d(64, 192, 3, padding=1), ReLU(), MaxPool2d(2),
                Conv2d(192, 384, 3, padding=1), ReLU(), Conv2d(384, 256, 3, padding=1), ReLU(),
                Conv2d(256, 256, 3, padding=1), ReLU(), MaxPool2d(2))
            pool = 2
        self.avgpool = AdaptiveAvgPool2d((pool, pool))
        self.classifier = Sequential(
            Dropout(config.dropout), Linear(256 * pool * pool, config.hidden), ReLU(),
            Dropout(config.dropout), Linear(config.hidden, config.hidden), ReLU(),
            Linear(config.hidden, config.num_classes))
        self.flatten = Flatten()

    def forward(self, x):
        _check_image("AlexNet", x, self.config.in_channels)
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


# --- VGG-16 -------------------------------------------------------------------------------
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@dataclass
class VGG16Config:
    """VGG-16 (configuration D), optionally with batch norm; `width` scales the channels (64 = the paper).

    The classifier sees (image_size // 32)² positions: 1 for CIFAR's 32x32, 7 for 224x224."""

    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    batch_norm: bool = True
    hidden: int = 4096
    dropout: float = 0.5
    width: int = 64

    def __post_init__(self):
        _positive(self, "num_classes", "in_channels", "image_size", "hidden", "width")
        if self.image_size < 32:
            raise Error(f"VGG16Config: image_size must be >= 32 (five 2x2 poolings), found {self.image_size}")
        _dropout(self)


class VGG16(Module):
    def __init__(self, config: VGG16Config):
        super().__init__()
        self.config = config
        layers, c = [], config.in_channels
        for v in _VGG16:
            if v == "M":
                layers.append(MaxPool2d(2))
                continue
            out = v * config.width // 64
            layers.append(Conv2d(c, out, 3, padding=1))
            layers += [BatchNorm2d(out), ReLU()] if config.batch_norm else [ReLU()]
            c = out
        self.features = Sequential(*layers)
        pool = config.image_size // 32
        self.avgpool = AdaptiveAvgPool2d((pool, pool))
        self.flatten = Flatten()
        self.classifier = Sequential(
            Linear(c * pool * pool, config.hidden), ReLU(), Dropout(config.dropout),
            Linear(config.hidden, config.hidden), ReLU(), Dropout(config.dropout),
            Linear(config.hidden, config.num_classes))
        for m in self.modules():
            if isinstance(m, Conv2d):
                init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                init.zeros_(m.bias)

    def forward(self, x):
        _check_image("VGG16", x, self.config.in_channels)
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


# --- ResNet -------------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> tuple[Conv2d, BatchNorm2d]:
    return Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), BatchNorm2d(cout)


class BasicBlock(Module):
    """Two 3x3 convolutions and an identity (or 1x1 projection) shortcut (He et al. 2016)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, width, 3, stride)
        self.conv2, self.bn2 = _conv_bn(width, width, 3)
        self.relu = ReLU()
        projection = stride != 1 or cin != width
        self.downsample = Sequential(*_conv_bn(cin, width, 1, stride)) if projection else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's v1.5), 1x1 expand by 4, plus shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        out = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, out, 1)
        self.relu = ReLU()
        projection = stride != 1 or cin != out
        self.downsample = Sequential(*_conv_bn(cin, out, 1, stride)) if projection else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


_RESNET_LAYOUTS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


@dataclass
class ResNetConfig:
    """ResNet-18/34/50. stem "cifar": one 3x3 conv, no pooling (for 32x32 inputs); stem "imagenet":
    7x7 stride-2 conv and 3x3 max pooling. `width` is the first stage's channels (64 = the paper)."""

    depth: int = 18
    num_classes: int = 10
    stem: str = "cifar"
    in_channels: int = 3
    width: int = 64
    zero_init_residual: bool = False

    def __post_init__(self):
        if self.depth not in _RESNET_LAYOUTS:
            raise Error(f"ResNetConfig: depth must be one of {sorted(_RESNET_LAYOUTS)}, found {self.depth!r}")
        if self.stem not in ("cifar", "imagenet"):
            raise Error(f"ResNetConfig: stem must be 'cifar' or 'imagenet', found {self.stem!r}")
        _positive(self, "num_classes", "in_channels", "width")


class ResNet(Module):
    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        block, counts = _RESNET_LAYOUTS[config.depth]
        w = config.width
        if config.stem == "cifar":
            self.conv1, self.bn1 = _conv_bn(config.in_channels, w, 3)
            self.maxpool = None
        else:
            self.conv1 = Conv2d(config.in_channels, w, 7, stride=2, padding=3, bias=False)
            self.bn1 = BatchNorm2d(w)
            self.maxpool = MaxPool2d(3, 2, 1)
        self.relu = ReLU()
        cin = w
        for i, count in enumerate(counts):
            width = w * 2 ** i
            blocks = []
            for j in range(count):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i + 1}", Sequential(*blocks))
        self.avgpool = AdaptiveAvgPool2d((1, 1))
        self.flatten = Flatten()
        self.fc = Linear(cin, config.num_classes)
        for m in self.modules():
            if isinstance(m, Conv2d):
                init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if config.zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
            for m in self.modules():
                last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if last is not None:
                    init.zeros_(last.weight)

    def forward(self, x):
        _check_image("ResNet", x, self.config.in_channels)
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


def _resnet(depth: int, kwargs: dict) -> ResNet:
    names = {f.name for f in fields(ResNetConfig)} - {"depth"}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise Error(f"resnet{depth}: unknown config field(s) {unknown}; expected some of {sorted(names)}")
    return ResNet(ResNetConfig(depth=depth, **kwargs))


def resnet18(**kwargs) -> ResNet:
    """ResNet-18; keyword arguments are `ResNetConfig` fields (num_classes, stem, in_channels, width)."""
    return _resnet(18, kwargs)


def resnet34(**kwargs) -> ResNet:
    return _resnet(34, kwargs)


def resnet50(**kwargs) -> ResNet:
    return _resnet(50, kwargs)


# Registry entries `resnet18/34/50`: the same config with the depth preset.
@dataclass
class ResNet18Config(ResNetConfig):
    depth: int = 18


@dataclass
class ResNet34Config(ResNetConfig):
    depth: int = 34


@dataclass
class ResNet50Config(ResNetConfig):
    depth: int = 50
