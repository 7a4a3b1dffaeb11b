"""Initialisation helpers shared by the layer files."""

import math

import torch
import torch.nn as nn


def orthogonal_scaled(weight: torch.Tensor, scale: float, generator: torch.Generator | None) -> None:
    """orthogonal_ with gain scale * sqrt(rows/cols) when rows > cols (the official generate_init_weight)."""
    rows, cols = weight.shape
    gain = scale * (math.sqrt(rows / cols) if rows > cols else 1.0)
    nn.init.orthogonal_(weight, gain=gain, generator=generator)
