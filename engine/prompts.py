"""What a tokenized request carries to the engine: its ids, and its images as the processor
made them (or, once the vision tower ran, as features)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EncodedPrompt:
    """A tokenized prompt, ready for prefill. ``vision`` holds the processor's image tensors."""

    input_ids: list[int]
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values, image_grid_thw
    mm_token_type_ids: list[int] | None = None
    features: "ImageFeatures | None" = None  # the vision tower's output, once computed


@dataclass
class ImageFeatures:
    """One prompt's share of a vision-tower call: per image, the merged features (and, for
    Qwen3-VL, the per-layer deepstack features), in the model's own output type."""

    output_type: type
    pooled: list[torch.Tensor]
    deepstack: list[list[torch.Tensor]] | None = None  # [layer][image]
