"""An exponential moving average of the trainable weights (`train.ema_decay`), evaluated and saved in
their place, as timm's `ModelEmaV3` and torch's `swa_utils.AveragedModel` do.

Only parameters that train are averaged (a frozen tower is never copied). Neither warm-up drags in the
random initialisation; they differ in when the configured decay `d` starts to hold (`train.ema_warmup`):
- `"num_updates"` (tf.train.ExponentialMovingAverage's rule, diffusers' default): the decay of update
  `t` is `min(d, (1 + t) / (10 + t))`, so `d` holds only after `(10 d - 1) / (1 - d)` updates (440 for
  0.98, 890 for 0.99). Before that the average is polynomial, over roughly the last `t / 9` updates.
- `"bias_correction"`: `d` from the first update, the average normalised by `1 - d^t` as Adam's moments
  are: the exponential average `sum_s d^(t-s) w_s / sum_s d^(t-s)` of the updates so far, whose window
  is about `1 / (1 - d)` updates once `t` is past it.
`state_dict` / `load_state_dict` let `accelerate` checkpoint it, so a resumed run continues the same
average.
"""

from __future__ import annotations

import contextlib
import math
import typing
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from granalign.training.recipe import EmaWarmup

__all__ = ["EMA_WARMUPS", "WeightEMA", "num_updates_until_decay"]

EMA_WARMUPS: tuple[str, ...] = typing.get_args(EmaWarmup)


def num_updates_until_decay(decay: float, warmup: str) -> int:
    """The number of updates after which the configured `decay` holds (0 with `"bias_correction"`)."""
    if warmup == "bias_correction":
        return 0
    return max(0, math.ceil((10 * decay - 1) / (1 - decay) - 1e-9))


class WeightEMA:
    """The moving average of `model`'s trainable parameters (a shadow copy, on their device)."""

    def __init__(self, model: nn.Module, decay: float, warmup: str = "num_updates") -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay!r}")
        if warmup not in EMA_WARMUPS:
            raise ValueError(f"the EMA warm-up must be one of {EMA_WARMUPS}, got {warmup!r}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {
            name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad
        }

    def current_decay(self) -> float:
        """The decay of the next update (`t` updates done): `min(d, (1 + t) / (10 + t))` with
        `"num_updates"`, `1 - (1 - d) / (1 - d^(t + 1))` with `"bias_correction"` (0 first: the first
        update copies the weights)."""
        t = self.num_updates
        if self.warmup == "bias_correction":
            return 1.0 - (1.0 - self.decay) / (1.0 - self.decay ** (t + 1))
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """`shadow ← d · shadow + (1 − d) · weights` after an optimizer step."""
        weight = 1.0 - self.current_decay()
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().to(self.shadow[name].dtype), weight)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block `model` holds the averaged weights; its own come back afterwards."""
        params = dict(model.named_parameters())
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise ValueError(f"the EMA holds parameters the model lacks: {missing[:5]}")
        saved = {name: params[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, value in self.shadow.items():
                params[name].copy_(value)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": self.shadow,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("the checkpoint's EMA averages other parameters than this model trains")
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        self.warmup = state.get("warmup", "num_updates")  # checkpoints from before the choice existed
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
