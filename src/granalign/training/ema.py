"""An exponential moving average of the trainable weights (`train.ema_decay`), evaluated and saved in
their place, as timm's `ModelEmaV3` and torch's `swa_utils.AveragedModel` do.

Only parameters that train are averaged (a frozen tower is never copied). The effective decay warms up
as `min(decay, (1 + t) / (10 + t))` after `t` updates, so early averages do not drag in the random
initialisation. `state_dict` / `load_state_dict` let `accelerate` checkpoint it, so a resumed run continues
the same average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["WeightEMA"]


class WeightEMA:
    """The moving average of `model`'s trainable parameters (a shadow copy, on their device)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {
            name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad
        }

    def current_decay(self) -> float:
        """The decay of the next update: the warmed-up `min(decay, (1 + t) / (10 + t))`."""
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

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
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("the checkpoint's EMA averages other parameters than this model trains")
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
