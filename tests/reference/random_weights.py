"""Every parameter of a PyTorch model drawn at random, for live parity tests.

Fresh models initialise relative position biases to zero and norms to one, which would hide a port that
drops or mis-indexes them; here every tensor is random, at scales that keep activations moderate.
"""

from __future__ import annotations

import torch


def randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("rpb"):
                parameter.copy_(noise)
            elif "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * noise)
            elif name.endswith("layer_scale_parameters"):
                parameter.copy_(0.5 + 0.3 * noise)
            elif parameter.ndim >= 2:
                fan_in = parameter[0].numel()
                parameter.copy_(noise * (1.5 / fan_in**0.5))
            else:
                parameter.copy_(0.1 * noise)
