"""The four layers as subclasses of their torch.nn twins.

Only forward (and Conv2d's _conv_forward) is overridden, so constructors,
parameter init, state_dict keys and versioning, repr, hooks and isinstance
checks are torch's own.
"""
import torch
from torch import Tensor

from . import functional as F

__all__ = ["Linear", "Conv2d", "MaxPool2d", "BatchNorm2d"]


class Linear(torch.nn.Linear):
    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)


class Conv2d(torch.nn.Conv2d):
    def _conv_forward(self, input: Tensor, weight: Tensor, bias) -> Tensor:
        if self.padding_mode != "zeros":
            # Same as torch: pad with the mode in Python, then convolve unpadded.
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                            mode=self.padding_mode)
            return F.conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, self.bias)


class MaxPool2d(torch.nn.MaxPool2d):
    def forward(self, input: Tensor):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class BatchNorm2d(torch.nn.BatchNorm2d):
    def forward(self, input: Tensor) -> Tensor:
        # torch's _BatchNorm.forward, calling our batch_norm.
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if track else None,
                            self.running_var if track else None, self.weight, self.bias,
                            bn_training, factor, self.eps)
