"""Which model class runs which architecture."""
from __future__ import annotations

import torch

from ..config import ModelConfig


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int | None = None,
                quantization: tuple[str, int] = ("none", 0)):
    """The model for `cfg.architecture`: Gemma 3 has its own class, the Llama family shares one."""
    if cfg.architecture == "gemma3_text":
        from .gemma3 import Gemma3Model

        return Gemma3Model(cfg, dtype, device, max_positions=max_positions, quantization=quantization)
    from .llama import LlamaModel

    return LlamaModel(cfg, dtype, device, max_positions=max_positions, quantization=quantization)
