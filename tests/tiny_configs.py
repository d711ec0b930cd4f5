"""Tiny tower configs in the transformers test style (hidden 32, 2 layers, 32 px images)."""

from __future__ import annotations

import torch

from granalign import GranAlignConfig, GranAlignModel

IMAGE_SIZE = 32
VOCAB_SIZE = 100

VISION_TOWERS: dict[str, dict] = {
    "vit": {
        "model_type": "vit",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    },
    "swin": {
        "model_type": "swin",
        "image_size": IMAGE_SIZE,
        "patch_size": 4,
        "embed_dim": 8,
        "depths": [1, 1],
        "num_heads": [1, 2],
        "window_size": 4,
    },
    "clip_vision_model": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    },
    "dinov2": {
        "model_type": "dinov2",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "mlp_ratio": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
    },
    "convnext": {
        "model_type": "convnext",
        "hidden_sizes": [8, 16],
        "depths": [1, 1],
        "num_stages": 2,
        "image_size": IMAGE_SIZE,
    },
}

TEXT_TOWERS: dict[str, dict] = {
    "bert": {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 64,
    },
    "roberta": {
        "model_type": "roberta",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 66,
        "pad_token_id": 1,
    },
}

REGION_DIM = 24


def tiny_config(vision: str | None = "vit", text: str = "bert", **overrides) -> GranAlignConfig:
    """A tiny GRM config; `vision=None` means precomputed regions of size REGION_DIM."""
    kwargs = {"embed_dim": 32, "num_regions": 3, **overrides}
    if vision is None:
        kwargs.setdefault("region_feature_dim", REGION_DIM)
    else:
        kwargs["vision_config"] = VISION_TOWERS[vision]
    return GranAlignConfig(text_config=TEXT_TOWERS[text], **kwargs)


def tiny_model(vision: str | None = "vit", text: str = "bert", seed: int = 0, **overrides) -> GranAlignModel:
    torch.manual_seed(seed)
    return GranAlignModel(tiny_config(vision, text, **overrides))


def image_inputs(
    vision: str | None, batch: int, seed: int = 0, num_regions: int = 6
) -> dict[str, torch.Tensor]:
    """Random pixel values, or region features with a variable number of real regions per image."""
    generator = torch.Generator().manual_seed(seed)
    if vision is not None:
        return {"pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}
    features = torch.randn(batch, num_regions, REGION_DIM, generator=generator)
    mask = torch.ones(batch, num_regions, dtype=torch.long)
    for row in range(batch):
        mask[row, num_regions - (row % 3) :] = 0
    return {"region_features": features, "region_mask": mask}


def text_inputs(batch: int, length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random captions of variable length (padding at the end), ids avoiding the special tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB_SIZE, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        attention_mask[row, length - (row % 4) :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


WORDS = (
    "a an the red green blue yellow purple orange circle square triangle star cross small large big "
    "left right above below of to and on in with two three dog cat photo picture"
).split()


def tiny_tokenizer(directory):
    """A BERT WordPiece tokenizer over a few dozen words (ids < VOCAB_SIZE), built offline."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    assert len(vocab) <= VOCAB_SIZE
    path = directory / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(path))


# A training recipe small enough for end-to-end tests: 10 optimiser steps per epoch on 16 scenes.
MICRO_RECIPE: dict = {
    "name": "micro",
    "seed": 3,
    "data": {
        "source": "builtin",
        "args": {"num_train": 16, "num_validation": 6, "num_test": 6, "image_size": 32},
    },
    "model": {
        "vision_config": {
            "model_type": "vit",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "image_size": 32,
            "patch_size": 16,
        },
        "text_config": {
            "model_type": "bert",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 40,
        },
        "tokenizer": "captions",
        "max_length": 24,
        "grm": {"embed_dim": 16, "num_regions": 3},
    },
    "augment": {"flip_swaps_left_right": True},
    "optim": {"lr": 1e-3, "schedule": "step", "milestones": [1], "warmup_steps": 2},
    "train": {
        "epochs": 2,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "checkpoint_every_steps": 4,
        "log_with": "none",
        "progress_bar": False,
    },
    "eval": {"batch_size": 4},
}
