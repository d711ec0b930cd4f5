"""One training step as a module: encode, gather across processes, GRM loss on the global batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from granalign.distributed import gather_output, gather_tensor, world_size
from granalign.modeling_granalign import GranAlignModel, concat_image_outputs, concat_text_outputs

__all__ = ["ContrastiveStep"]


class ContrastiveStep(nn.Module):
    """Encode a batch, gather both sides across processes, and compute the GRM loss on the global batch.

    Wrapping this (not the bare model) in DDP keeps the whole step inside one `forward`, so DDP's
    gradient hooks and accelerate's autocast see it.
    """

    def __init__(self, model: GranAlignModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], hardest_negative: bool) -> Any:
        image = self.model.encode_image(
            pixel_values=batch.get("pixel_values"),
            region_features=batch.get("region_features"),
            region_mask=batch.get("region_mask"),
            vision_hidden_states=batch.get("vision_hidden_states"),
        )
        text = self.model.encode_text(
            batch.get("input_ids"),
            batch["attention_mask"],
            text_hidden_states=batch.get("text_hidden_states"),
        )
        image_ids, caption_ids = batch["image_ids"], batch.get("caption_ids")
        if world_size() > 1:
            image = gather_output(image, concat_image_outputs)
            text = gather_output(text, concat_text_outputs)
            image_ids = gather_tensor(image_ids)
            caption_ids = None if caption_ids is None else gather_tensor(caption_ids)
        return self.model.compute_loss(
            image, text, image_ids=image_ids, hardest_negative=hardest_negative, caption_ids=caption_ids
        )
