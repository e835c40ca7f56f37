"""An exponential moving average of a model's weights, kept beside the trained ones for sampling.

Averaging the last few hundred steps' weights smooths the noise of small-batch training on a small
dataset. The average is held as a state dict (floating-point entries averaged, the rest copied), so
it loads into the same model class; the checkpoint keeps it under ``ema`` next to the raw ``model``,
which resume still needs. The decay is warmed up as ``min(decay, (1 + n) / (10 + n))`` after n
updates, so the first steps' random weights are forgotten quickly.
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the model's weights after one optimizer step into the average."""
        self.updates += 1
        weight = 1 - self.current_decay()
        for name, value in model.state_dict().items():
            avg = self.shadow[name]
            if avg.is_floating_point():
                avg.lerp_(value.detach().to(avg.dtype), weight)
            else:
                avg.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
