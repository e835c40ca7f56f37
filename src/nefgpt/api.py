"""The Python API: sample and render fields from a trained run or a shipped model, e.g. in a notebook.

    import nefgpt
    gen = nefgpt.load("runs/demo")                  # a trained run directory, or
    gen = nefgpt.load_pretrained("mnist")           # the model shipped in the package, offline
    fields = gen.sample(labels=[7] * 16, seed=0)    # the run's tuned sampling setting
    images = fields.render(res=128)                 # (16, 128, 128) float tensor in [0, 1]

Sampling goes through the same function as the `sample` stage (nefgpt.sample.draw): the same labels,
seed and setting give exactly the tokens that ``nefgpt sample --label ... -n ... --seed ...`` writes.
The setting is resolved as the stage resolves it (nefgpt.tune.sampling_config): the run's config.json,
with the setting `nefgpt tune` chose filled in. Nothing here writes to the run directory.

Errors are nefgpt.errors.NefgptError subclasses with a one-line message, as the CLI prints them.
"""

from __future__ import annotations

import copy
import json
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch

from . import field
from .artifacts import load_json
from .checkpoint import load_checked_model
from .config import RunConfig, SampleConfig, from_dict, load_preset
from .critic import Critic
from .errors import ArtifactError, UsageError
from .generate import trained_config
from .layout import CKPT_FILE, CONFIG_FILE, TOKENIZER_FILE
from .model import GPT
from .pretrained import model_dir
from .sample import draw, run_critic
from .codebook import Tokenizer, Vocab, load_tokenizer
from .tune import sampling_config
from .validation import SAMPLING_KEYS, check_critic_quantile
from .weight_prior import WeightPrior, run_prior

__all__ = ["Fields", "Generator", "load", "load_pretrained"]


@dataclass(frozen=True, eq=False)
class Fields:
    """A batch of generated neural fields.

    weights: (N, spec.num_params) float32, in the flatten order of nefgpt.field.
    labels: (N,) int64, the class each field was conditioned on (slot numbers for an unconditional model).
    spec: the field architecture the weights belong to.
    tokens: (N, spec.num_params) int64 code tokens the weights were decoded from.
    setting: the sampling setting they were drawn with ({temperature, top_k, top_p, min_p, guidance, oversample}).
    """

    weights: torch.Tensor
    labels: torch.Tensor
    spec: field.FieldSpec
    tokens: torch.Tensor | None = None
    setting: dict | None = None

    def __len__(self) -> int:
        return self.weights.shape[0]

    def render(self, res: int = 28) -> torch.Tensor:
        """Brightness images (N, res, res), float32 in [0, 1], rendered at pixel centres (nefgpt.field.render).

        The fields were fitted at 28x28; any resolution samples the same continuous function.
        """
        if isinstance(res, bool) or not isinstance(res, int) or res < 1:
            raise UsageError(f"res must be a positive integer, got {res!r}")
        return field.render(self.spec, self.weights, res)


class Generator:
    """A trained GPT with its tokenizer and its run's sampling setting; make one with `load` or `load_pretrained`.

    Attributes: `run_dir` (where it was loaded from), `vocab` (nefgpt.codebook.Vocab), `spec` (the field
    architecture), `conditioned` (False for a model trained with train.conditioning = none), `config`
    (the run's resolved RunConfig, tuned setting filled in), `model` and `tokenizer`.
    """

    def __init__(self, run_dir: Path, model: GPT, tokenizer: Tokenizer, trained: dict, config: RunConfig):
        self.run_dir = run_dir
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self._trained = trained  # the checkpoint's train config: guidance and conditioning are checked against it
        # Fitting the prior over every weight takes seconds (EM per class), so each shape is fitted once.
        self._priors: dict[tuple[int, int, str], WeightPrior] = {}
        self._critics: dict[str, Critic] = {}  # by setting: each one draws and trains for a minute or two

    @property
    def vocab(self) -> Vocab:
        return self.tokenizer.vocab

    @property
    def spec(self) -> field.FieldSpec:
        return self.tokenizer.spec

    @property
    def num_classes(self) -> int:
        return self.vocab.num_classes

    @property
    def conditioned(self) -> bool:
        return self._trained.get("conditioning", "class") == "class"

    @property
    def setting(self) -> dict:
        """The sampling setting `sample` uses by default: {temperature, top_k, top_p, min_p, guidance, oversample,
        prior_weight, prior_components, prior_dims, prior_gpt_weight, prior_positions, prior_component_draw}."""
        return {k: getattr(self.config.sample, k) for k in SAMPLING_KEYS}

    def __repr__(self) -> str:
        return (f"Generator({str(self.run_dir)!r}, classes={self.num_classes}, weights={self.spec.num_params}, "
                f"setting={self.setting})")

    def sample(self, labels: Iterable[int] | None = None, *, n_per_class: int = 1, seed: int | None = None,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               min_p: float | None = None, guidance: float | None = None, oversample: float | None = None,
               prior_weight: float | None = None, prior_components: int | None = None, prior_dims: int | None = None,
               prior_gpt_weight: float | None = None, prior_positions: str | None = None,
               prior_component_draw: str | None = None, critic_fields: int | None = None,
               critic_quantile: float | None = None, batch_size: int | None = None,
               progress: bool = False) -> Fields:
        """Generate fields, one per entry of `labels`, in that order.

        labels: class indices in 0..num_classes-1 (repeat a label for several fields); None samples
            `n_per_class` fields of every class (the only choice for an unconditional model).
        seed: seeds the sampling generator; None is the run's sample.seed. The same seed, labels and
            setting give the same fields every time.
        temperature, top_k, top_p, min_p, guidance, oversample, prior_weight, prior_components, prior_dims,
            prior_gpt_weight, prior_positions, prior_component_draw: replace that value of `self.setting` only, as
            ``nefgpt sample --temperature ...`` does (top_k 0, top_p 1, min_p 0, oversample 1 and prior_weight 0
            are off; a prior weight needs the run's training tokens, or a shipped model's fitted prior of that shape).
        critic_fields, critic_quantile: rejection by a critic (nefgpt.critic; critic_fields 0 is off). The run's
            critic.safetensors serves every seed of the setting it was trained for; another setting trains a new
            critic (it draws critic_fields fields per class first: a minute or two on a CPU), kept in memory.
        batch_size: fields generated together; None is the run's sample.batch_size, which is what makes the
            fields equal to the CLI's: the batching decides which random draws each field gets.
        """
        cfg = copy.deepcopy(self.config.sample)
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p, "guidance": guidance,
                 "oversample": oversample, "prior_weight": prior_weight, "prior_components": prior_components,
                 "prior_dims": prior_dims, "prior_gpt_weight": prior_gpt_weight,
                 "prior_positions": prior_positions, "prior_component_draw": prior_component_draw, "seed": seed,
                 "critic_fields": critic_fields, "critic_quantile": critic_quantile, "batch_size": batch_size}
        for key, value in given.items():
            if value is not None:
                setattr(cfg, key, value)
        # The integers are checked here; draw checks the setting's ranges, as for the CLI.
        for key, minimum in (("top_k", 0), ("seed", 0), ("batch_size", 1), ("prior_components", 1), ("prior_dims", 0),
                             ("critic_fields", 0)):
            _integer(key, getattr(cfg, key), minimum)
        if labels is None:
            cfg.n_per_class = _integer("n_per_class", n_per_class, 1)
            chosen = None
        else:
            cfg.n_per_class = 1  # one field per listed label: draw lays out n_per_class copies of each
            chosen = _labels(labels)
        check_critic_quantile(cfg.critic_quantile)
        prior = self._prior(cfg.prior_components, cfg.prior_dims, cfg.prior_positions) if cfg.prior_weight > 0 else None
        critic = self._critic(cfg, prior, progress) if cfg.critic_fields > 0 else None
        tokens, all_labels, _ = draw(self.model, self.vocab, self.spec.num_params, self._trained, cfg, chosen,
                                     str(self.run_dir / CKPT_FILE), progress, prior, critic)
        return Fields(self.tokenizer.decode(tokens), all_labels, self.spec, tokens,
                      {k: getattr(cfg, k) for k in SAMPLING_KEYS})

    def _critic(self, cfg: SampleConfig, prior: WeightPrior | None, progress: bool) -> Critic:
        key = json.dumps({k: getattr(cfg, k) for k in (*SAMPLING_KEYS, "critic_fields", "critic_quantile")})
        if key not in self._critics:
            self._critics[key] = run_critic(self.model, self.tokenizer, self._trained, cfg, self.run_dir, progress,
                                            prior, save=False)
        return self._critics[key]

    def _prior(self, components: int, dims: int, positions: str) -> WeightPrior:
        key = (components, dims, positions)
        if key not in self._priors:
            self._priors[key] = run_prior(self.run_dir, self.tokenizer, components, dims, positions)
        return self._priors[key]


def load(run_dir: str | PathLike, device: str | torch.device = "cpu") -> Generator:
    """The GPT of a trained run directory (one `nefgpt train` has finished in), ready to sample.

    The run's config.json decides the default sampling setting (with tune.json's choice when the run was
    tuned), as for `nefgpt sample`. On another device than the CPU the tokens can differ from the CLI's.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ArtifactError(f"{path}: run directory not found")
    saved = path / CONFIG_FILE
    # A run without config.json samples with the default preset, as the CLI would.
    cfg = from_dict(load_json(saved), source=str(saved)) if saved.exists() else load_preset("cpu")
    if cfg.train.model != "gpt":
        raise UsageError(f"{path}: its model is the {cfg.train.model} baseline; nefgpt.load samples GPT runs only "
                         f"(use `nefgpt sample --out {path}`)")
    for name, stage in ((TOKENIZER_FILE, "tokenize"), (CKPT_FILE, "train")):
        if not (path / name).exists():
            raise ArtifactError(f"{path / name}: file not found; run `nefgpt {stage} --out {path}` first")
    tok = load_tokenizer(path / TOKENIZER_FILE)
    model, ckpt = load_checked_model(path, tok.vocab, tok.spec, tok.id)
    return Generator(path, model.to(device), tok, trained_config(ckpt), sampling_config(cfg, path))


def load_pretrained(name: str = "mnist", device: str | torch.device = "cpu") -> Generator:
    """A model shipped in the package (nefgpt/pretrained_models/NAME), read in place, offline."""
    return load(model_dir(name), device)


def _integer(what: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _labels(labels: Iterable[int]) -> list[int]:
    """Class indices as plain ints (a list, a range or an integer tensor); their range is checked by draw."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise UsageError(f"labels must be a list of class indices (e.g. [7] * 4), got {labels!r}")
    out = []
    for c in labels:
        try:
            out.append(operator.index(c))
        except TypeError:
            raise UsageError(f"label {c!r} is not an integer class index") from None
    if not out:
        raise UsageError("labels is empty; give at least one class index, or None for every class")
    return out
