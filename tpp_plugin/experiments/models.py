r"""Reference models and a plain training loop, used by the demo, ``reproduce`` and the tests.

Every model uses ``nn.ReLU`` modules (SpikingJelly's converters match exactly that type; pass
``qcfs_levels`` to get :class:`~tpp_plugin.QCFS` instead). ``mlp8``, ``cnn5`` and ``vgg`` are
``nn.Sequential`` with average pooling only (every op between activations affine);
``cnn5_maxpool`` puts ``ReLU → MaxPool2d`` pairs in, and ``resnet`` is a torchvision-style
residual network (``BasicBlock`` with one ``ReLU(inplace=True)`` used twice per block).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import fx, nn

from ..qcfs import QCFS, replace_relu

__all__ = [
    "digits_cnn",
    "cnn5",
    "mlp8",
    "vgg",
    "cnn5_maxpool",
    "BasicBlock",
    "resnet",
    "MODELS",
    "build_model",
    "spiking_layers",
    "train_ann",
    "progress_bar",
    "framework_bars_off",
    "ann_accuracy",
]


def digits_cnn(
    qcfs_levels: int | None = None, channels: int = 16, image_size: int = 8, in_channels: int = 1,
    pool: type[nn.Module] = nn.AvgPool2d,
) -> nn.Sequential:
    """A 5-spiking-layer CNN (four convolutions, one hidden linear layer), 8×8 digits by default.

    Average pooling by default, so every op between activations is affine (docs/design.md §4).

    :param qcfs_levels: if given, every ReLU is a :class:`~tpp_plugin.QCFS` with that many levels
    :param channels: width of the first convolution
    :param image_size: side of the square input images (at least 4)
    :param in_channels: input channels
    :param pool: the 2×2 pooling after the second and fourth convolution (``nn.MaxPool2d`` for
        :func:`cnn5_maxpool`)

    Shape: ``[N, in_channels, image_size, image_size]`` → ``[N, 10]``.

    Example::

        >>> digits_cnn(image_size=28)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if image_size < 4:
        raise ValueError(f"image_size must be at least 4, got {image_size}")
    c, side = channels, image_size // 2 // 2  # two 2×2 poolings (floor)
    net = nn.Sequential(
        nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(),
        pool(2),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.ReLU(),
        pool(2),
        nn.Flatten(),
        nn.Linear(4 * c * side * side, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )
    return replace_relu(net, L=qcfs_levels) if qcfs_levels else net


def cnn5(image_size: int = 28, qcfs_levels: int | None = None, channels: int = 16):
    """The 5-spiking-layer CNN of :func:`digits_cnn` for ``image_size``-pixel images."""
    return digits_cnn(qcfs_levels, channels=channels, image_size=image_size)


def mlp8(
    image_size: int = 28, qcfs_levels: int | None = None, width: int = 256,
    hidden_layers: int = 8, in_channels: int = 1,
) -> nn.Sequential:
    """A multilayer perceptron with ``hidden_layers`` (8) spiking hidden layers of ``width`` units.

    :param image_size: side of the square input images
    :param qcfs_levels: if given, every ReLU is a :class:`~tpp_plugin.QCFS` with that many levels
    :param width: units per hidden layer
    :param hidden_layers: number of hidden (spiking) layers
    :param in_channels: input channels

    Shape: ``[N, in_channels, image_size, image_size]`` → ``[N, 10]``.

    Example::

        >>> net = mlp8(image_size=8, width=32)
        >>> spiking_layers(net), net(torch.zeros(2, 1, 8, 8)).shape
        (8, torch.Size([2, 10]))
    """
    layers: list = [nn.Flatten()]
    features = in_channels * image_size * image_size
    for _ in range(hidden_layers):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    net = nn.Sequential(*layers, nn.Linear(features, 10))
    return replace_relu(net, L=qcfs_levels) if qcfs_levels else net


def vgg(
    image_size: int = 28, qcfs_levels: int | None = None, channels: int = 16,
    in_channels: int = 1,
) -> nn.Sequential:
    """A VGG-style CNN with 8 spiking layers: 3×3 convolutions with batch norm in blocks of 2, 2
    and 3, average pooling between the blocks, global average pooling, one hidden linear layer.

    SpikingJelly's rate-coding converter folds each batch norm into its convolution
    (``fuse_flag=True``); elsewhere it stays an affine layer in eval mode.

    :param image_size: side of the square input images (at least 4)
    :param qcfs_levels: if given, every ReLU is a :class:`~tpp_plugin.QCFS` with that many levels
    :param channels: width of the first block (then 2× and 4×)
    :param in_channels: input channels

    Shape: ``[N, in_channels, image_size, image_size]`` → ``[N, 10]``.

    Example::

        >>> net = vgg(image_size=8, channels=4)
        >>> spiking_layers(net), net(torch.zeros(2, 1, 8, 8)).shape
        (8, torch.Size([2, 10]))
    """
    if image_size < 4:
        raise ValueError(f"image_size must be at least 4, got {image_size}")
    c = channels
    plan = [c, c, "pool", 2 * c, 2 * c, "pool", 4 * c, 4 * c, 4 * c]
    layers: list = []
    features = in_channels
    for item in plan:
        if item == "pool":
            layers.append(nn.AvgPool2d(2))
            continue
        layers += [
            nn.Conv2d(features, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU(),
        ]
        features = item
    layers += [
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features, 128), nn.ReLU(),
        nn.Linear(128, 10),
    ]
    net = nn.Sequential(*layers)
    return replace_relu(net, L=qcfs_levels) if qcfs_levels else net


def cnn5_maxpool(
    image_size: int = 28, qcfs_levels: int | None = None, channels: int = 16,
    in_channels: int = 1,
) -> nn.Sequential:
    """:func:`cnn5` with ``ReLU → MaxPool2d(2)`` instead of average pooling (5 spiking layers).

    Shape: ``[N, in_channels, image_size, image_size]`` → ``[N, 10]``.

    Example::

        >>> cnn5_maxpool(image_size=8)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    return digits_cnn(qcfs_levels, channels, image_size, in_channels, pool=nn.MaxPool2d)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, with
    one ``ReLU(inplace=True)`` module called twice, and a 1×1 convolution + batch norm shortcut
    when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _ResNet(nn.Module):
    def __init__(self, channels: int, in_channels: int, blocks, num_classes: int = 10):
        super().__init__()
        c = channels
        self.conv1 = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], c
        for i, n in enumerate(blocks):
            planes = c * 2**i
            stage = [BasicBlock(in_planes, planes, 1 if i == 0 else 2)]
            stage += [BasicBlock(planes, planes) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def resnet(
    image_size: int = 28, qcfs_levels: int | None = None, channels: int = 16,
    in_channels: int = 1, blocks=(2, 1, 1),
) -> nn.Module:
    """A small torchvision-style ResNet: a 3×3 stem, three stages of :class:`BasicBlock` (widths
    ``c, 2c, 4c``, strides 1, 2, 2), global average pooling, dropout, ``torch.flatten`` and a
    linear classifier — 9 spiking layers with the default ``blocks=(2, 1, 1)``.

    Shape: ``[N, in_channels, image_size, image_size]`` → ``[N, 10]``.

    Example::

        >>> net = resnet(image_size=8, channels=4)
        >>> spiking_layers(net), net(torch.zeros(2, 1, 8, 8)).shape
        (9, torch.Size([2, 10]))
    """
    if image_size < 4:
        raise ValueError(f"image_size must be at least 4, got {image_size}")
    net = _ResNet(channels, in_channels, blocks)
    return replace_relu(net, L=qcfs_levels) if qcfs_levels else net


#: ``reproduce --model`` names → builders ``f(image_size=..., qcfs_levels=...)``
MODELS = {"mlp8": mlp8, "cnn5": cnn5, "vgg": vgg, "cnn5_maxpool": cnn5_maxpool, "resnet": resnet}


def build_model(name: str, image_size: int, qcfs_levels: int | None = None) -> nn.Module:
    """One of :data:`MODELS` by name, for single-channel ``image_size``-pixel images."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](image_size=image_size, qcfs_levels=qcfs_levels)


def spiking_layers(model: nn.Module) -> int:
    """The number of activation *calls* (``nn.ReLU`` or QCFS) in the ``torch.fx`` graph of an ANN:
    its spiking layers once converted (a module called twice, as in torchvision's
    ``BasicBlock``, counts twice)."""
    activations = {name for name, m in model.named_modules() if isinstance(m, (nn.ReLU, QCFS))}

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, QCFS) or super().is_leaf_module(m, qualname)

    graph = Tracer().trace(model)
    return sum(node.op == "call_module" and node.target in activations for node in graph.nodes)


def progress_bar(desc: str, total: int | None = None, unit: str = "it"):
    """A ``tqdm`` wrapper for an iterable (no bar when stderr is not a terminal, so logs stay
    readable; the iterable itself when tqdm is not installed)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the demo and reproduce
        return lambda it: it
    return lambda it: tqdm(it, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr,
                           disable=None)


#: SpikingJelly modules whose calibration loops show a tqdm bar per conversion
_FRAMEWORK_BAR_MODULES = (
    "spikingjelly.activation_based.ann2snn.recipes.rate_coding",
    "spikingjelly.activation_based.ann2snn.recipes.local_threshold_balancing",
    "spikingjelly.activation_based.ann2snn.converter",  # 0.0.0.0.14's Converter
)


@contextlib.contextmanager
def framework_bars_off():
    """Silence the tqdm bar SpikingJelly's converters draw over the calibration loader of every
    conversion (one per table cell in the demo) while the block runs; restored afterwards."""
    saved = []
    for name in _FRAMEWORK_BAR_MODULES:
        module = sys.modules.get(name)
        bar = getattr(module, "tqdm", None)
        if bar is None:
            continue

        def silent(*args, _bar=bar, **kwargs):
            return _bar(*args, **{**kwargs, "disable": True})

        saved.append((module, bar))
        module.tqdm = silent
    try:
        yield
    finally:
        for module, bar in saved:
            module.tqdm = bar


def train_ann(model: nn.Module, loader, epochs: int = 30, lr: float = 2e-3, progress=None):
    """Train ``model`` with Adam and cross-entropy; ``progress`` wraps the epoch range (tqdm)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.CrossEntropyLoss()
    epochs_iter = progress(range(epochs)) if progress else range(epochs)
    model.train()
    for _ in epochs_iter:
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def ann_accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) over ``loader``."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total
