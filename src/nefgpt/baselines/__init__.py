"""Models other than the GPT, trained on the same fields and scored by the same `evaluate`.

`nefgpt run --set train.model=NAME` swaps the `train` and `sample` stages for the
module NAME here. Each module has

- ``train(cfg: RunConfig, run_dir, progress) -> dict``: reads ``nefs.safetensors`` and
  ``split.json`` (training rows only), writes ``ckpt.pt`` (a plain dict, loadable with
  ``torch.load(weights_only=True)``) and ``train.json``;
- ``sample(cfg: RunConfig, run_dir, progress, labels) -> dict``: writes the same sample
  artifacts as the GPT's `sample` stage, through :func:`nefgpt.samples_io.save_samples`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BASELINES = ("regression", "diffusion", "gaussian", "copy_noise", "marginals", "mixture")


def baseline_module(name: str) -> ModuleType:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline '{name}' (choose from {', '.join(BASELINES)})")
    return importlib.import_module(f".{name}", __name__)
