"""The Python API: load a trained GPT run (or a shipped model) and sample fields from it.

    import nefgpt
    gen = nefgpt.load_pretrained("mnist")          # or nefgpt.load("runs/demo")
    fields = gen.sample(labels=[7] * 16, seed=0)   # the run's tuned sampling setting
    images = fields.render(res=128)                # (16, 128, 128) in [0, 1]

Sampling goes through nefgpt.sample.sample_tokens, the loop of the `sample` stage, with the
setting and batch size that stage would use, so ``gen.sample(labels=[c] * n, seed=s)`` gives
exactly the weights of ``nefgpt sample --label c -n n --seed s``. Nothing is written: a run
directory (and the package's shipped models) is only read.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Iterable

import torch

from . import config as config_mod
from . import field, pretrained, sample, tune
from .artifacts import load_json
from .errors import ArtifactError, UsageError
from .generate import check_guidance, check_sampling, trained_config
from .layout import CKPT_FILE, CONFIG_FILE, TOKENIZER_FILE, TUNE_FILE
from .tokenizer import load_tokenizer

__all__ = ["Fields", "Generator", "load", "load_pretrained"]


@dataclass
class Fields:
    """Sampled fields: `weights` (N, num_params) float32, `labels` (N,) int64, the field architecture `spec`
    and the sampling `setting` they were drawn with."""

    weights: torch.Tensor
    labels: torch.Tensor
    spec: field.FieldSpec
    setting: dict = dataclass_field(default_factory=dict)

    def __len__(self) -> int:
        return self.weights.shape[0]

    def render(self, res: int = 28) -> torch.Tensor:
        """Brightness images (N, res, res) in [0, 1]: each field evaluated on a res x res pixel grid."""
        if not (isinstance(res, int) and res >= 1):
            raise UsageError(f"res must be a positive integer, got {res!r}")
        return field.render(self.spec, self.weights, res)


class Generator:
    """A trained GPT with its tokenizer and sampling setting; make one with `load` or `load_pretrained`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._tok = load_tokenizer(run_dir / TOKENIZER_FILE)
        # The saved config decides the batch size (which draws each field gets) and whether the tuned setting
        # applies: both as the `sample` stage reads them, so API and CLI sample the same fields.
        self._cfg = config_mod.from_dict(load_json(run_dir / CONFIG_FILE), source=str(run_dir / CONFIG_FILE))
        if self._cfg.train.model != "gpt":
            raise UsageError(f"{run_dir}: a {self._cfg.train.model} baseline run; nefgpt.load needs a GPT run")
        # Looked up at call time: the checked loader lives in sample.py, or in checkpoint.py once moved there.
        loader = (getattr(sample, "load_checked_model", None)
                  or importlib.import_module(".checkpoint", __package__).load_checked_model)
        self._model, ckpt = loader(run_dir, self._tok.vocab, self._tok.spec, self._tok.id)
        self._trained = trained_config(ckpt)
        self.conditioned = self._trained.get("conditioning", "class") == "class"
        s = self._cfg.sample
        setting = {k: getattr(s, k) for k in tune.SAMPLING_KEYS}
        if s.use_tuned and (run_dir / TUNE_FILE).exists():  # as cli.sampling_config: hand-given keys win
            setting.update({k: v for k, v in tune.load_best_setting(run_dir).items() if k not in s.explicit})
        self._setting = setting

    @property
    def num_classes(self) -> int:
        """Number of classes the model was trained on; labels are 0..num_classes-1."""
        return self._tok.vocab.num_classes

    @property
    def spec(self) -> field.FieldSpec:
        """The architecture of the fields this model generates."""
        return self._tok.spec

    @property
    def setting(self) -> dict:
        """The default sampling setting {temperature, top_k, top_p, min_p, guidance} (a copy)."""
        return dict(self._setting)

    def sample(self, labels: Iterable[int], seed: int = 0, **overrides) -> Fields:
        """One field per entry of `labels` (their order kept), drawn with `seed`.

        `overrides` (temperature=, top_k=, top_p=, min_p=, guidance=) replace those keys of `setting`
        for this call. For an unconditional model the labels only number the fields.
        """
        unknown = sorted(set(overrides) - set(tune.SAMPLING_KEYS))
        if unknown:
            raise UsageError(f"unknown sampling option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(tune.SAMPLING_KEYS)}")
        setting = {**self._setting, **overrides}
        vocab = self._tok.vocab
        check_sampling(setting["temperature"], setting["top_k"], setting["top_p"], vocab.num_codes,
                       setting["guidance"], setting["min_p"])
        check_guidance(setting["guidance"], self._trained, str(self.run_dir / CKPT_FILE))
        labels = [_label(c, self.num_classes) for c in labels]
        if not labels:
            raise UsageError("labels is empty: give one class label per field to sample")
        all_labels = torch.tensor(labels, dtype=torch.long)
        tokens = sample.sample_tokens(self._model, vocab, self.spec.num_params, all_labels, setting, int(seed),
                                      self._cfg.sample.batch_size, self.conditioned)
        return Fields(self._tok.decode(tokens).float(), all_labels, self.spec, setting)

    def __repr__(self) -> str:
        return f"Generator({str(self.run_dir)!r}, num_classes={self.num_classes}, setting={self._setting})"


def _label(c, num_classes: int) -> int:
    # bool is an int subclass and a float 7.0 would silently pass as a class: refuse both.
    if isinstance(c, bool) or not isinstance(c, int) and not (isinstance(c, torch.Tensor) and c.ndim == 0):
        raise UsageError(f"label {c!r} is not an integer class")
    c = int(c)
    if not 0 <= c < num_classes:
        raise UsageError(f"label {c} is not a class of this model (0..{num_classes - 1})")
    return c


def load(run_dir: str | Path) -> Generator:
    """The GPT of a trained run directory (after `nefgpt train`; `nefgpt tune` adds the tuned setting)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: run directory not found")
    for name in (CONFIG_FILE, TOKENIZER_FILE, CKPT_FILE):
        if not (run_dir / name).exists():
            raise ArtifactError(f"{run_dir / name}: file not found; {run_dir} is not a trained GPT run")
    return Generator(run_dir)


def load_pretrained(name: str = "mnist") -> Generator:
    """A model shipped in the package (`nefgpt.pretrained.available()`), read in place, offline."""
    return load(pretrained.model_dir(name))
