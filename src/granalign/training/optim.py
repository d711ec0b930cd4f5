"""AdamW with backbone/new-module parameter groups and the learning-rate schedules of the recipes.

Groups: the towers (`model.vision_model`, `model.text_model`) get `lr * backbone_lr_multiplier`;
everything else (projections, adapters, region prompts, uncertainty head) gets `lr`. Weight decay
applies to matrices only: biases, norms and other 1-D or scalar parameters get none.

Schedules are multipliers of the group's peak learning rate, pure functions of the optimizer step:
`step` (× `gamma` at each milestone epoch, LAPS/VSE style), `cosine` (to `min_lr_ratio`) or `constant`,
each after an optional linear warmup.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LRSchedule", "build_optimizer", "build_scheduler", "parameter_groups"]

_SCHEDULES = ("step", "cosine", "constant")


def _tower_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of the towers' own parameters; adapters injected into a tower (peft LoRA) are new modules."""
    from granalign.training.lora import adapter_parameter_ids

    ids: set[int] = set()
    for name in ("vision_model", "text_model"):
        tower = getattr(model, name, None)
        if tower is not None:
            adapters = adapter_parameter_ids(tower)
            ids.update(id(p) for p in tower.parameters() if id(p) not in adapters)
    return ids


def parameter_groups(
    model: nn.Module, lr: float, backbone_lr_multiplier: float = 0.1, weight_decay: float = 1e-4
) -> list[dict]:
    """AdamW parameter groups (`name`, `params`, `lr`, `weight_decay`); empty groups are left out.

    Frozen parameters (`requires_grad=False`) are left out too. LoRA adapters in a tower (see
    `granalign.training.lora`) are new parameters: they get the full `lr`, not the backbone multiplier.
    """
    towers = _tower_parameter_ids(model)
    groups: dict[str, dict] = {}
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "backbone" if id(param) in towers else "new"
        decay = param.dim() >= 2
        key = f"{part}_{'decay' if decay else 'no_decay'}"
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "lr": lr * (backbone_lr_multiplier if part == "backbone" else 1.0),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    order = ("backbone_decay", "backbone_no_decay", "new_decay", "new_no_decay")
    return [groups[key] for key in order if key in groups]


def build_optimizer(
    model: nn.Module,
    lr: float,
    backbone_lr_multiplier: float = 0.1,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over `parameter_groups(model, ...)`."""
    groups = parameter_groups(model, lr, backbone_lr_multiplier, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


@dataclass
class LRSchedule:
    """Learning-rate multiplier at an optimizer step (a picklable, JSON-able callable for `LambdaLR`).

    Args:
        schedule: "step", "cosine" or "constant".
        steps_per_epoch: optimizer steps per epoch (milestones are epochs).
        total_steps: optimizer steps of the whole run (cosine length).
        milestones: epochs at which the "step" schedule multiplies by `gamma`.
        warmup_steps: linear warmup from `1/warmup_steps` to 1.
    """

    schedule: str
    steps_per_epoch: int
    total_steps: int
    milestones: tuple[int, ...] = ()
    gamma: float = 0.3
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.schedule!r}; expected one of {_SCHEDULES}")
        if self.steps_per_epoch < 1 or self.total_steps < 1:
            raise ValueError(
                f"steps_per_epoch and total_steps must be >= 1, got {self.steps_per_epoch}, {self.total_steps}"
            )
        self.milestones = tuple(self.milestones)

    @classmethod
    def from_recipe(cls, optim: Any, train: Any, steps_per_epoch: int) -> LRSchedule:
        """The schedule of a recipe's `optim` and `train` sections for `steps_per_epoch` optimizer steps."""
        return cls(optim.schedule, steps_per_epoch, steps_per_epoch * train.epochs, tuple(optim.milestones),
                   optim.gamma, optim.warmup_steps, optim.min_lr_ratio)  # fmt: skip

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "step":
            epoch = step // self.steps_per_epoch
            return self.gamma ** bisect.bisect_right(self.milestones, epoch)
        if self.schedule == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> LambdaLR:
    """`LambdaLR` applying `schedule` to every group's peak lr; step it once per optimizer step."""
    return LambdaLR(optimizer, schedule)
