"""The Session 6 model, exactly as docs/SPEC.md describes it.

Attribute names are the original notebook's (conv1..conv6, bn1..bn5, drop1, drop2, pool1,
pool2, gap1), so a `state_dict` saved by that notebook loads here with `strict=True`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.spec import BATCHNORM_EPS, BATCHNORM_MOMENTUM, DROPOUT_RATE, NUM_CLASSES


def _batchnorm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BATCHNORM_EPS, momentum=BATCHNORM_MOMENTUM)


class Net(nn.Module):
    """4,328 parameters: six bias-free VALID convolutions, five BatchNorms, two Dropouts, two
    max pools and a global average pool; log-probabilities out."""

    def __init__(self, dropout: float = DROPOUT_RATE):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.bn1 = _batchnorm(8)
        self.conv2 = nn.Conv2d(8, 16, 3, bias=False)
        self.bn2 = _batchnorm(16)
        self.drop1 = nn.Dropout(dropout)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(16, 8, 1, bias=False)
        self.bn3 = _batchnorm(8)
        self.conv4 = nn.Conv2d(8, 16, 3, bias=False)
        self.bn4 = _batchnorm(16)
        self.drop2 = nn.Dropout(dropout)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.conv5 = nn.Conv2d(16, 16, 1, bias=False)
        self.bn5 = _batchnorm(16)
        self.conv6 = nn.Conv2d(16, 10, 3, bias=False)
        self.gap1 = nn.AvgPool2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) normalised images -> (N, 10) log-probabilities.

        Note the block order conv -> ReLU -> BatchNorm, and ReLU (no BatchNorm) after conv6.
        """
        x = self.drop1(self.bn2(F.relu(self.conv2(self.bn1(F.relu(self.conv1(x)))))))
        x = self.pool1(x)
        x = self.drop2(self.bn4(F.relu(self.conv4(self.bn3(F.relu(self.conv3(x)))))))
        x = self.pool2(x)
        x = F.relu(self.conv6(self.bn5(F.relu(self.conv5(x)))))
        x = self.gap1(x)
        return F.log_softmax(x.view(-1, NUM_CLASSES), dim=-1)
