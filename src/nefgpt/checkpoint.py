"""Checkpoints: the nanoGPT-style plain dict ``{model, optimizer, model_args, iter_num, ...}`` in RUN/ckpt.pt.

Below the stages: `train` writes checkpoints, `sample`, `tune` and the API read the GPT back through
here, so none of them imports another stage to find a model. Reading is ``torch.load(weights_only=True)``
(nefgpt.artifacts), so a checkpoint can hold tensors and plain containers only, never code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .artifacts import load_checkpoint, save_checkpoint
from .errors import ArtifactError
from .layout import CKPT_FILE, TOKENIZER_FILE
from .model import GPT, GPTConfig

if TYPE_CHECKING:  # the tokenizer stage stays out of this module's imports
    from .field import FieldSpec
    from .codebook import Vocab

__all__ = ["load_checkpoint", "save_checkpoint", "saved_model_args", "sampling_weights", "load_model", "load_checked_model"]


def saved_model_args(ckpt: dict) -> dict | None:
    """A checkpoint's model args with the keys added since it was written at their defaults (off); None if invalid."""
    try:
        return GPTConfig(**ckpt["model_args"]).to_dict()
    except (TypeError, ValueError):
        return None


def sampling_weights(ckpt: dict) -> dict:
    """The weights to sample with: the moving average when training kept one (train.ema_decay), else the model's."""
    ema = ckpt.get("ema")
    return ema["shadow"] if isinstance(ema, dict) and "shadow" in ema else ckpt["model"]


def load_model(run_dir: Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """The run's GPT in eval mode, with its sampling weights, and its checkpoint."""
    ckpt = load_checkpoint(run_dir / CKPT_FILE)
    try:
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])  # checked even when the average is what samples: resume needs it
        model.load_state_dict(sampling_weights(ckpt))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{run_dir / CKPT_FILE}: does not hold a valid GPT ({str(exc).splitlines()[0][:160]})") from None
    return model.to(device).eval(), ckpt


def load_checked_model(run_dir: Path, vocab: Vocab, spec: FieldSpec, tok_id: str) -> tuple[GPT, dict]:
    """The run's GPT and checkpoint, refused unless it was trained with this tokenizer and field architecture."""
    model, ckpt = load_model(run_dir)
    if ckpt.get("tokenizer_id") != tok_id:
        raise ArtifactError(f"{run_dir / CKPT_FILE}: trained with another tokenizer than {run_dir / TOKENIZER_FILE}")
    mc = model.config
    if (mc.vocab_size, mc.num_codes) != (vocab.size, vocab.num_codes):
        raise ArtifactError(f"{run_dir / CKPT_FILE}: vocabulary of {mc.vocab_size} tokens ({mc.num_codes} codes) differs "
                            f"from {run_dir / TOKENIZER_FILE}'s {vocab.size} ({vocab.num_codes} codes)")
    if mc.block_size != spec.num_params + 2:
        raise ArtifactError(f"{run_dir / CKPT_FILE}: model generates {mc.block_size - 2} weights, but the field "
                            f"architecture {spec.to_meta()} in {run_dir / TOKENIZER_FILE} has {spec.num_params}")
    return model, ckpt
