"""TResNet-M/L/XL (Ridnik et al., WACV 2021) as used by ASL, and ML-Decoder's TResNet-L v2, with the official
checkpoints' key layout."""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Optional, Type, Union

import torch
import torch.nn as nn

from .layers import ABN, AntiAliasDownsample, BottleneckHead, GlobalAvgPool, SEModule, SpaceToDepth, conv_abn

__all__ = ["TResNet", "BasicBlock", "Bottleneck", "TResNetConfig", "TRESNET_CONFIGS", "MIN_INPUT_SIZE"]


class TResNetConfig(NamedTuple):
    layers: tuple[int, int, int, int]
    """blocks per stage"""
    width: float
    """width factor: the stem has int(64 * width) channels"""
    v2: bool = False
    """bottleneck blocks in the first two stages too (BasicBlocks otherwise)"""


# original: TResnetM / TResnetL / TResnetXL of ASL; tresnet_v2_l is ML-Decoder's TResnetL (timm's tresnet_v2_l),
# a different network from ASL's tresnet_l that the ML-Decoder COCO "TResNet-L" models are built on.
TRESNET_CONFIGS = {
    "tresnet_m": TResNetConfig((3, 4, 11, 3), 1.0),
    "tresnet_l": TResNetConfig((4, 5, 18, 3), 1.2),
    "tresnet_xl": TResNetConfig((4, 5, 24, 3), 1.3),
    "tresnet_v2_l": TResNetConfig((3, 4, 23, 3), 1.0, v2=True),
}

#: The smallest input side: the stem folds 4x4 blocks into channels (a multiple of 4), and the blur of each of the
#: three stride-2 stages pads by reflection, which needs a side of at least 2 there: side / 4 = 5 -> 3 -> 2 works,
#: 16 px (4 -> 2 -> 1) does not.
MIN_INPUT_SIZE = 20

# Slopes of the leaky ReLUs: 1e-2 in the stem, 1e-3 inside the residual blocks (original).
BLOCK_SLOPE = 1e-3


def _strided_conv(in_ch: int, out_ch: int, kernel_size: int, stride: int) -> nn.Sequential:
    """A stride-2 conv is a stride-1 conv followed by the blur-downsample.

    Nesting matters for the key names: ``convN.0.0.weight`` / ``convN.0.1.*`` then the parameter-free blur
    as ``convN.1``, exactly as the official files.
    """
    conv = conv_abn(in_ch, out_ch, stride=1, kernel_size=kernel_size, activation_param=BLOCK_SLOPE)
    if stride == 1:
        return conv
    return nn.Sequential(conv, AntiAliasDownsample(out_ch, stride=stride))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 use_se: bool = True) -> None:
        super().__init__()
        self.conv1 = _strided_conv(inplanes, planes, 3, stride)
        self.conv2 = conv_abn(planes, planes, stride=1, activation="identity")
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.se = SEModule(planes, max(planes // 4, 64)) if use_se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        if self.se is not None:
            out = self.se(out)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 use_se: bool = True) -> None:
        super().__init__()
        self.conv1 = conv_abn(inplanes, planes, kernel_size=1, activation_param=BLOCK_SLOPE)
        self.conv2 = _strided_conv(planes, planes, 3, stride)
        self.conv3 = conv_abn(planes, planes * self.expansion, kernel_size=1, activation="identity")
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        # original: the SE sits between conv2 and conv3, on `planes` channels, reduced to planes*4/8 (min 64).
        self.se = SEModule(planes, max(planes * self.expansion // 8, 64)) if use_se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        if self.se is not None:
            out = self.se(out)
        out = self.conv3(out)
        return self.relu(out + shortcut)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class TResNet(nn.Module):
    """TResNet backbone + linear (or bottleneck) head. Input: RGB in [0, 1], no mean/std normalisation.

    ``v2``: bottleneck blocks in all four stages (ML-Decoder's TResNet-L, timm's ``tresnet_v2_l``); the stem, the
    blocks and their key names are otherwise the same.
    """

    def __init__(self, layers: tuple[int, int, int, int], num_classes: int = 1000, in_chans: int = 3,
                 width_factor: float = 1.0, bottleneck_head: bool = False, bottleneck_features: int = 512,
                 v2: bool = False) -> None:
        super().__init__()
        planes = int(64 * width_factor)
        self._inplanes = planes
        first: Block = Bottleneck if v2 else BasicBlock
        stages = [
            ("layer1", first, planes, layers[0], 1, True),
            ("layer2", first, planes * 2, layers[1], 2, True),
            ("layer3", Bottleneck, planes * 4, layers[2], 2, True),
            ("layer4", Bottleneck, planes * 8, layers[3], 2, False),
        ]
        body = [("SpaceToDepth", SpaceToDepth()), ("conv1", conv_abn(in_chans * 16, planes, stride=1))]
        body += [(name, self._make_stage(block, p, n, s, se)) for name, block, p, n, s, se in stages]
        self.body = nn.Sequential(OrderedDict(body))
        self.global_pool = nn.Sequential(OrderedDict([("global_pool_layer", GlobalAvgPool(flatten=True))]))
        self.num_features = planes * 8 * Bottleneck.expansion
        self.num_classes = num_classes
        fc: nn.Module
        if bottleneck_head:
            fc = BottleneckHead(self.num_features, num_classes, bottleneck_features)
        else:
            fc = nn.Linear(self.num_features, num_classes)
        self.head = nn.Sequential(OrderedDict([("fc", fc)]))
        self._init_weights()

    def _make_stage(self, block: Block, planes: int, blocks: int, stride: int, use_se: bool) -> nn.Sequential:
        downsample = None
        out_channels = planes * block.expansion
        if stride != 1 or self._inplanes != out_channels:
            parts: list[nn.Module] = []
            if stride == 2:
                # original: average-pool first, then the 1x1 projection (keys downsample.1.*).
                parts.append(nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True, count_include_pad=False))
            parts.append(conv_abn(self._inplanes, out_channels, kernel_size=1, activation="identity"))
            downsample = nn.Sequential(*parts)
        stage = [block(self._inplanes, planes, stride, downsample, use_se=use_se)]
        self._inplanes = out_channels
        stage += [block(self._inplanes, planes, use_se=use_se) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, ABN):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
        # original: the last norm of each residual branch starts at zero, so every block starts as identity
        # (InPlaceABN still scales by |0| + eps, so the branch is tiny rather than exactly zero).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.conv2[1].weight)
            elif isinstance(m, Bottleneck):
                nn.init.zeros_(m.conv3[1].weight)

    def attach_spatial_head(self, head: nn.Module) -> None:
        """Replaces the global pool and the classifier by ``head``, which reads the (N, C, H, W) feature map.

        original (ML-Decoder's add_ml_decoder_head): ``global_pool`` becomes an identity and ``head`` is the new
        module itself, so its keys sit directly under ``head.`` (``head.decoder.*``). Attached after construction,
        the head keeps its own initialisation rather than the backbone's ``normal(0, 0.01)`` for linear layers.
        """
        self.global_pool = nn.Identity()
        self.head = head

    @staticmethod
    def input_size_problem(size: int) -> Optional[str]:
        """Why a square input of ``size`` pixels cannot run, or None when it can."""
        if size >= MIN_INPUT_SIZE and size % 4 == 0:
            return None
        smallest = max(MIN_INPUT_SIZE, -(-size // 4) * 4)
        return f"TResNet takes multiples of 4 from {MIN_INPUT_SIZE} px up (the nearest that works: {smallest})"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.global_pool(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
