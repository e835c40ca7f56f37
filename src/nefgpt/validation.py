"""Validation of a resolved configuration: one check per setting, each naming the setting in its message.

`config` calls `validate` on every configuration it builds; the stages call the single-setting checks
(`check_sampling`, `check_choice`, `check_vocab_size`) on values that come from elsewhere (a tune grid, the
data's class count), so each rule is written once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .baselines import BASELINES
from .codebook import OFFSET_MODES, ORDERS
from .errors import UsageError
from .model import POS_BIAS_MODES
from .objectives import OBJECTIVES

if TYPE_CHECKING:
    from .config import RunConfig, TuneConfig


_NON_NEGATIVE = {
    "data": ("subset_per_class", "tune_per_class"),
    "fit": ("steps", "anchor_steps", "init_l2", "augment_shifts"),
    "tokenize": ("max_iters",),
    "train": ("max_iters", "warmup_iters", "head_dim", "max_minutes", "pos_bias_decay", "hl_sigma",
              "pos_bias_lr_mult"),
    # The other [tune] settings: check_tune below; the sampling ones: check_sampling.
    "tune": ("budget", "samples_per_class"),
    "sample": ("critic_fields",),
    "regression": ("noise",),
    "diffusion": ("dropout", "p_uncond", "max_minutes", "min_lr_frac", "warmup_iters", "weight_decay", "grad_clip",
                  "eta", "clip_x0"),
}
_POSITIVE = {
    "data": ("heldout_per_class",),
    "fit": ("octaves", "batch_size", "chunk_size", "lr", "anchor_lr"),
    "tokenize": ("num_codes",),
    "train": ("n_layer", "n_head", "n_embd", "batch_size", "lr", "eval_interval", "ckpt_interval",
              "first_layer_weight"),
    "sample": ("n_per_class", "batch_size"),
    "evaluate": ("classifier_epochs", "classifier_batch_size", "classifier_lr"),
    "regression": ("residual_fields",),
    "diffusion": ("width", "n_blocks", "timesteps", "batch_size", "max_iters", "lr", "eval_interval",
                  "ckpt_interval", "eval_timesteps", "sample_steps"),
    "baseline": ("components", "dims"),
}


MAX_OVERSAMPLE = 100  # candidates per field kept: beyond this the sampling time, not the choice, is the problem


def check_critic_quantile(quantile: float, prefix: str = "") -> None:
    if not 0 <= quantile < 1:  # also refuses NaN
        raise UsageError(f"{prefix}critic_quantile must be in [0, 1), got {quantile}")


def check_sampling(temperature: float, top_k: int, top_p: float, num_codes: int, guidance: float = 1.0,
                   min_p: float = 0.0, prefix: str = "", num_codes_name: str = "", oversample: float = 1.0,
                   prior_weight: float = 0.0, prior_components: int = 1, prior_dims: int = 0,
                   prior_gpt_weight: float = 1.0, prior_positions: str = "first_layer",
                   prior_component_draw: str = "posterior") -> None:
    """The one check of the sampling values (config validation, `sample`, `tune` and the API all call it).

    ``prefix`` names their section in the messages ("sample."); ``num_codes_name`` names top-k's bound.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"{prefix}temperature must be a finite number >= 0, got {temperature}")
    if top_k != 0 and not (isinstance(top_k, int) and 1 <= top_k <= num_codes):
        bound = f"{num_codes_name} = {num_codes}" if num_codes_name else str(num_codes)
        raise UsageError(f"{prefix}top_k must be 0 (off) or between 1 and {bound}, got {top_k}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):  # also refuses NaN
        raise UsageError(f"{prefix}top_p must be in (0, 1], got {top_p}")
    if not (isinstance(min_p, (int, float)) and 0 <= min_p < 1):  # also refuses NaN
        raise UsageError(f"{prefix}min_p must be in [0, 1) (0 is off), got {min_p}")
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
        raise UsageError(f"{prefix}guidance must be a finite number >= 0, got {guidance}")
    if not (isinstance(oversample, (int, float)) and 1 <= oversample <= MAX_OVERSAMPLE):  # also refuses NaN
        raise UsageError(f"{prefix}oversample must be in [1, {MAX_OVERSAMPLE}] (1 is off), got {oversample}")
    if not (isinstance(prior_weight, (int, float)) and math.isfinite(prior_weight) and prior_weight >= 0):
        raise UsageError(f"{prefix}prior_weight must be a finite number >= 0 (0 is off), got {prior_weight}")
    if not (isinstance(prior_components, int) and prior_components >= 1):
        raise UsageError(f"{prefix}prior_components must be an integer >= 1, got {prior_components}")
    if not (isinstance(prior_dims, int) and prior_dims >= 0):
        raise UsageError(f"{prefix}prior_dims must be an integer >= 0 (0 = all positions), got {prior_dims}")
    if prior_components > 1 and prior_dims == 0:
        raise UsageError(f"{prefix}prior_components = {prior_components} needs {prefix}prior_dims >= 1: a mixture "
                         "lives in the leading principal directions (prior_dims 0 is the one full Gaussian)")
    if prior_positions not in PRIOR_POSITIONS:
        raise UsageError(f"{prefix}prior_positions must be one of {', '.join(PRIOR_POSITIONS)}, got {prior_positions!r}")
    if prior_component_draw not in PRIOR_COMPONENT_DRAWS:
        raise UsageError(f"{prefix}prior_component_draw must be one of {', '.join(PRIOR_COMPONENT_DRAWS)}, "
                         f"got {prior_component_draw!r}")
    if not (isinstance(prior_gpt_weight, (int, float)) and 0 <= prior_gpt_weight <= 1):
        raise UsageError(f"{prefix}prior_gpt_weight must be in [0, 1] (1 is the plain product), "
                         f"got {prior_gpt_weight}")


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "guidance", "oversample", "prior_weight",
                 "prior_components", "prior_dims", "prior_gpt_weight", "prior_positions", "prior_component_draw")
PRIOR_POSITIONS = ("first_layer", "all")
PRIOR_COMPONENT_DRAWS = ("posterior", "first")


def check_choice(dotted: str, value: Any, choices: Any) -> None:
    """The one check of a setting with a fixed set of values (``choices``: any iterable of names)."""
    if value not in choices:
        raise UsageError(f"{dotted} must be one of {', '.join(choices)}, got {value!r}")


_CHOICES = {
    ("fit", "init"): ("shared", "random"),
    ("tokenize", "init"): ("quantile", "random"),
    ("tokenize", "offsets"): OFFSET_MODES,
    ("tokenize", "order"): ORDERS,
    ("train", "dtype"): ("auto", "bf16", "fp32"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "model"): ("gpt", *BASELINES),
    ("train", "conditioning"): ("class", "none"),
    ("train", "pos_bias"): POS_BIAS_MODES,
    ("regression", "loss"): ("mse", "l1"),
    ("diffusion", "dtype"): ("auto", "bf16", "fp32"),
    ("diffusion", "device"): ("auto", "cpu", "cuda"),
    ("baseline", "covariance"): ("full", "diag"),
}


MAX_VOCAB = 65536


def check_vocab_size(num_codes: int, num_classes: int) -> None:
    """codes + SOS + one token per class must fit the token ids; the data (its split) gives num_classes."""
    if num_codes + 1 + num_classes > MAX_VOCAB:
        raise UsageError(f"tokenize.num_codes is too large: {num_codes} codes + SOS + {num_classes} classes "
                         f"exceed {MAX_VOCAB} tokens")


_TUNE_LISTS = {"temperatures": "temperature", "top_ks": "top_k", "top_ps": "top_p", "min_ps": "min_p",
               "guidances": "guidance", "oversamples": "oversample", "prior_weights": "prior_weight",
               "prior_components": "prior_components", "prior_dims": "prior_dims",
               "prior_gpt_weights": "prior_gpt_weight", "prior_positions": "prior_positions",
               "prior_component_draws": "prior_component_draw"}


def check_tune(cfg: TuneConfig, num_codes: int) -> None:
    """The one check of the [tune] settings: config validation and candidate_settings both call it."""
    neutral = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "guidance": 1.0, "oversample": 1.0,
               "prior_weight": 0.0, "prior_components": 1, "prior_dims": 1, "prior_gpt_weight": 1.0,
               "prior_positions": "first_layer", "prior_component_draw": "posterior"}
    for name, key in _TUNE_LISTS.items():
        if not getattr(cfg, name):
            raise UsageError(f"tune.{name} must list at least one value")
        for value in getattr(cfg, name):
            try:
                check_sampling(**{**neutral, key: value}, num_codes=num_codes)
            except UsageError as exc:
                raise UsageError(f"tune.{name}: {exc}") from None
    if any(w > 0 for w in cfg.prior_weights) and any(k > 1 for k in cfg.prior_components) and 0 in cfg.prior_dims:
        raise UsageError("tune.prior_components lists mixtures (> 1), which need tune.prior_dims >= 1, and "
                         "tune.prior_dims lists 0 (the one full Gaussian)")
    check_choice("tune.objective", cfg.objective, OBJECTIVES)
    check_choice("tune.search", cfg.search, ("grid", "random"))
    if not 0 <= cfg.min_accuracy <= 1:
        raise UsageError(f"tune.min_accuracy must be in [0, 1], got {cfg.min_accuracy}")
    if not 0 <= cfg.fallback_margin <= 1:
        raise UsageError(f"tune.fallback_margin must be in [0, 1], got {cfg.fallback_margin}")
    if not (math.isfinite(cfg.max_minutes) and cfg.max_minutes >= 0):
        raise UsageError(f"tune.max_minutes must be a finite number >= 0 (0 = no budget), got {cfg.max_minutes}")
    if cfg.n_per_class < 1:
        raise UsageError(f"tune.n_per_class must be > 0, got {cfg.n_per_class}")
    if OBJECTIVES[cfg.objective].uses_diversity and cfg.n_per_class < 2:
        raise UsageError(f"tune.objective = {cfg.objective} measures the diversity within each class, which needs "
                         f"tune.n_per_class >= 2, got {cfg.n_per_class}")


def validate(cfg: RunConfig) -> RunConfig:
    """Reject values that can't work, with the setting's name in the message."""
    for table, positive in ((_NON_NEGATIVE, False), (_POSITIVE, True)):
        for section, keys in table.items():
            for key in keys:
                v = getattr(getattr(cfg, section), key)
                if not (v > 0 if positive else v >= 0) or (isinstance(v, float) and not math.isfinite(v)):  # NaN, inf
                    raise UsageError(f"{section}.{key} must be " + ("> 0" if positive else "a finite number >= 0")
                                     + f", got {v}")
    for (section, key), choices in _CHOICES.items():
        check_choice(f"{section}.{key}", getattr(getattr(cfg, section), key), choices)
    if cfg.fit.augment_shifts > 8:
        raise UsageError(f"fit.augment_shifts must be in 0..8 (one-pixel shifts in 8 directions), "
                         f"got {cfg.fit.augment_shifts}")
    if not cfg.fit.hidden or min(cfg.fit.hidden) < 1:
        raise UsageError(f"fit.hidden must be a non-empty list of positive sizes, got {cfg.fit.hidden}")
    check_vocab_size(cfg.tokenize.num_codes, 1)  # the class count comes with the data: checked again at tokenize
    if cfg.tokenize.offsets not in ("none", "pca") and cfg.fit.init != "shared":
        raise UsageError(f"tokenize.offsets = {cfg.tokenize.offsets} needs fit.init = shared: random-init fields have "
                         "no shared anchor to take offsets from (use tokenize.offsets = none)")
    if cfg.tokenize.offsets == "pca" and (cfg.train.struct_pos or cfg.train.first_layer_weight != 1):
        raise UsageError("tokenize.offsets = pca makes each position a principal component, not a weight: "
                         "train.struct_pos and train.first_layer_weight need weight positions (turn them off)")
    if cfg.tokenize.order != "input_first":
        if cfg.tokenize.offsets == "pca":
            raise UsageError("tokenize.offsets = pca orders the sequence by variance: it takes "
                             "tokenize.order = input_first")
        if cfg.train.struct_pos or cfg.train.first_layer_weight != 1:
            raise UsageError(f"tokenize.order = {cfg.tokenize.order}: train.struct_pos and train.first_layer_weight "
                             "assume the flatten order (turn them off)")
    # Sampling values are checked here too, so a bad --temperature/--top-p/--top-k is refused before
    # config.json is saved and before `sample` clears its old outputs (`sample` and `tune` call the same check).
    s = cfg.sample
    check_sampling(s.temperature, s.top_k, s.top_p, cfg.tokenize.num_codes, s.guidance, s.min_p,
                   prefix="sample.", num_codes_name="tokenize.num_codes", oversample=s.oversample,
                   prior_weight=s.prior_weight, prior_components=s.prior_components, prior_dims=s.prior_dims,
                   prior_gpt_weight=s.prior_gpt_weight, prior_positions=s.prior_positions,
                   prior_component_draw=s.prior_component_draw)
    check_critic_quantile(s.critic_quantile, prefix="sample.")
    unknown = [k for k in s.explicit if k not in SAMPLING_KEYS]
    if unknown:
        raise UsageError(f"sample.explicit lists {', '.join(unknown)}: not a sampling key ({', '.join(SAMPLING_KEYS)})")
    check_tune(cfg.tune, cfg.tokenize.num_codes)
    t = cfg.train
    if not 0 <= t.p_uncond <= 1:  # also refuses NaN
        raise UsageError(f"train.p_uncond must be in [0, 1], got {t.p_uncond}")
    if not 0 <= t.ema_decay < 1:
        raise UsageError(f"train.ema_decay must be in [0, 1) (0 = off), got {t.ema_decay}")
    if not 0 <= t.dropout < 1:
        raise UsageError(f"train.dropout must be in [0, 1), got {t.dropout}")
    # Guidance mixes class and null-class predictions: only a model that learned both can give them
    # (generate.check_guidance checks the checkpoint's own config: a different rule, on the trained model).
    # The oversample score compares the class with the null class too.
    for key in ("guidance", "oversample"):
        value = getattr(s, key)
        if value != 1 and t.model == "gpt" and (t.conditioning != "class" or t.p_uncond == 0):
            raise UsageError(f"sample.{key} = {value} needs train.conditioning = class and train.p_uncond > 0 "
                             f"(null-class dropout), got conditioning = {t.conditioning}, p_uncond = {t.p_uncond}")
    return cfg
