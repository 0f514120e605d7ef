"""CASIA-Net, the per-region network of the paper.

Ten 3x3 convolutions in five pairs; batch norm and ReLU after all but the last;
max pooling after pairs 1-4, global average pooling after pair 5, dropout 0.5 and
a fully connected classifier. At ``width=1`` the channels are the paper's
(32/64, 64/128, 96/192, 128/256, 160/320), the pooled feature is 320-d and a
100x100 crop costs 1.53 GFLOP. ``width`` scales every layer, so tests can train
small nets on a CPU.
"""
from __future__ import annotations

import torch
from torch import nn

BASE_CHANNELS = ((32, 64), (64, 128), (96, 192), (128, 256), (160, 320))


def _conv(cin: int, cout: int, norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not norm)]
    if norm:
        layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return layers


class CASIANet(nn.Module):
    def __init__(self, num_classes: int, width: float = 1.0, in_chans: int = 1, drop_rate: float = 0.5):
        """
        Args:
            num_classes: outputs of the classifier (0 for a feature extractor).
            width: channel multiplier; 1.0 is the paper's network.
            in_chans: 1 for grayscale crops.
            drop_rate: dropout before the classifier.
        """
        super().__init__()
        self.width = width
        layers: list[nn.Module] = []
        # Index into ``features`` of the first layer of each conv pair (plus the end), for partial transfer.
        self.pair_starts: list[int] = []
        cin = in_chans
        for i, (c1, c2) in enumerate(BASE_CHANNELS):
            self.pair_starts.append(len(layers))
            c1, c2 = max(4, round(c1 * width)), max(4, round(c2 * width))
            last = i == len(BASE_CHANNELS) - 1
            layers += _conv(cin, c1, norm=True)
            layers += _conv(c1, c2, norm=not last)  # the paper: no batch norm after the last conv
            if not last:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            cin = c2
        self.pair_starts.append(len(layers))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin
        self.drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Linear(cin, num_classes) if num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            _init_module(m)

    @property
    def num_pairs(self) -> int:
        return len(self.pair_starts) - 1

    def reinit_pairs_from(self, pair: int) -> None:
        """Re-initialise conv pairs ``pair`` (0-based) to the last, as a fresh net would start them.

        Fine-tuning from a net pretrained on a small or distant task keeps only its first,
        more general pairs (Yosinski et al. 2014): ``reinit_pairs_from(2)`` keeps two.
        """
        if not 0 <= pair <= self.num_pairs:
            raise ValueError(f"pair must be between 0 and {self.num_pairs}, got {pair}")
        for layer in self.features[self.pair_starts[pair]:]:
            for m in layer.modules():
                _init_module(m)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features, ``N x num_features``."""
        return self.pool(self.features(x)).flatten(1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, gain: float = 0.3) -> None:
        """A new final layer, Xavier-normal at ``gain`` (the paper's fine-tuning recipe)."""
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.xavier_normal_(self.fc.weight, gain=gain)
            nn.init.zeros_(self.fc.bias)


def _init_module(m: nn.Module) -> None:
    """The paper's initialisation: He-normal convolutions and linear layers, identity batch norm."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # He-normal
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        m.reset_running_stats()
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.kaiming_normal_(m.weight)
        nn.init.zeros_(m.bias)


def create_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    if arch != "casia-net":
        raise ValueError(f"unknown architecture {arch!r}")
    return CASIANet(num_classes, **kwargs)
