"""Stage `sample`: generate class-conditioned fields with the trained GPT.

Generation itself (decoding, guidance, the logit filters) is nefgpt.generate;
this stage picks the classes, checks the settings against the run's model, trains
or reuses the critic that rejects candidates when sample.critic_fields > 0 (nefgpt.critic), and
writes the sample artifacts (nefgpt.samples_io). It also sizes a sampling up
front, so an absurd ``-n`` is refused before any work.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from .checkpoint import load_checked_model
from .config import SampleConfig
from .validation import SAMPLING_KEYS, check_sampling
from .errors import UsageError
from .generate import check_guidance, draw_tokens, trained_config
from .layout import CKPT_FILE, CRITIC_FILE, TOKENIZER_FILE
from .model import GPT
from .samples_io import save_samples
from .codebook import Tokenizer, Vocab, load_tokenizer
from .critic import SEED, Critic, load_critic, model_fingerprint, save_critic, train_critic
from .weight_prior import WeightPrior, run_prior, training_codes


# Sampling time per field when the run has none measured: a conservative CPU figure (the demo GPT measured
# 0.066 s per field on 2 cores, docs/compare.json; the baselines are much faster).
DEFAULT_SECONDS_PER_FIELD = 0.1
LONG_SAMPLING_S = 600  # warn above 10 minutes


def sampling_bytes_per_field(num_weights: int) -> int:
    """Memory a sampled field takes until the artifacts are written: int64 tokens while sampling, int16 tokens
    and float32 weights saved, and its 28x28 float32 render (and the .npz copy of it)."""
    return num_weights * (8 + 2 + 4) + 2 * 28 * 28 * 4


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on every platform
        return None


def check_sampling_size(n_per_class: int, classes: int, num_weights: int,
                        seconds_per_field: float | None = None, measured: bool = False) -> str | None:
    """Refuse (UsageError) a sampling whose results would not fit in half of the machine's memory;
    return a one-line warning when it would run longer than LONG_SAMPLING_S, else None.

    Called before any work is done, so an absurd ``-n`` changes nothing.
    """
    n = n_per_class * classes
    need = n * sampling_bytes_per_field(num_weights)
    ram = physical_memory()
    if ram and need > ram // 2:
        raise UsageError(f"sample.n_per_class = {n_per_class}: {n} fields of {num_weights} weights would need an "
                         f"estimated {_size(need)} of memory, more than half of this machine's {_size(ram)}; "
                         "sample fewer per class (-n)")
    per_field = seconds_per_field if seconds_per_field and seconds_per_field > 0 else DEFAULT_SECONDS_PER_FIELD
    seconds = n * per_field
    if seconds <= LONG_SAMPLING_S:
        return None
    how = "measured by this run's last sampling" if measured and seconds_per_field else "a rough CPU figure"
    return (f"nefgpt: warning: sampling {n} fields (sample.n_per_class = {n_per_class}) will take an estimated "
            f"{_duration(seconds)} ({per_field:.3g} s per field, {how})")


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:,.1f} TiB"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.0f} days"


def draw(model: GPT, vocab: Vocab, num_weights: int, trained: dict, cfg: SampleConfig, labels: list[int] | None,
         where: str, progress: bool = False, prior: WeightPrior | None = None, critic: Critic | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(tokens (N, num_weights), labels (N,), conditioned): cfg.n_per_class fields for each of `labels`
    (None: every class), in that order, as the `sample` stage draws them.

    The one place that lays out the labels, seeds the generator (cfg.seed) and batches generation
    (cfg.batch_size: the batching decides which random draws each field gets), so the stage and
    nefgpt.api give the same tokens for the same labels, seed and setting. `trained` is the checkpoint's
    train config and `where` names the checkpoint in messages; `prior` is the run's first-layer prior, which
    cfg.prior_weight > 0 needs, and `critic` the one cfg.critic_fields > 0 needs (fit_critic).
    """
    check_sampling(**{k: getattr(cfg, k) for k in SAMPLING_KEYS}, num_codes=vocab.num_codes)
    check_guidance(cfg.guidance, trained, where)
    check_guidance(cfg.oversample, trained, where, key="oversample")
    conditioned = trained.get("conditioning", "class") == "class"
    if labels and not conditioned:
        raise UsageError(f"{where} is an unconditional model (train.conditioning = none): "
                         "it cannot sample chosen classes; leave out --label")
    classes = list(range(vocab.num_classes)) if labels is None else labels
    for c in classes:
        if not 0 <= c < vocab.num_classes:
            raise UsageError(f"label {c} is not a class of this model (0..{vocab.num_classes - 1})")
    # An unconditional model draws as many fields as a conditional run (n_per_class for each class slot, so
    # set metrics compare equal sizes); its labels only number the slots and are not conditions.
    all_labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(cfg.n_per_class)
    conditions = all_labels if conditioned else torch.full_like(all_labels, -1)
    gen = torch.Generator().manual_seed(cfg.seed)
    setting = {k: getattr(cfg, k) for k in SAMPLING_KEYS}
    if cfg.prior_weight > 0 and not conditioned:
        raise UsageError(f"sample.prior_weight > 0 is a class's density, but {where} is an unconditional model "
                         "(train.conditioning = none); use prior_weight 0")
    if cfg.critic_fields > 0 and not conditioned:
        raise UsageError(f"sample.critic_fields > 0 judges fields of a class, but {where} is an unconditional model "
                         "(train.conditioning = none); use critic_fields 0")
    if critic is None:
        tokens = draw_tokens(model, conditions, vocab, num_weights, setting, gen, cfg.batch_size, progress, prior)
    else:
        tokens, _ = critic.draw_accepted(lambda labs: draw_tokens(model, labs, vocab, num_weights, setting, gen,
                                                                  cfg.batch_size, progress, prior),
                                         conditions, gen)
    return tokens, all_labels, conditioned


def critic_matches(critic: Critic, tok_id: str, model_id: str, cfg: SampleConfig) -> bool:
    """A saved critic serves a sampling when it was trained against this model and tokenizer at this setting."""
    want = {"tokenizer_id": tok_id, "model_id": model_id, "setting": {k: getattr(cfg, k) for k in SAMPLING_KEYS},
            "critic_fields": cfg.critic_fields, "quantile": cfg.critic_quantile}
    return all(critic.info.get(k) == v for k, v in want.items())


def fit_critic(model: GPT, model_id: str, tok: Tokenizer, trained: dict, cfg: SampleConfig, run_dir: Path,
               where: str, progress: bool = False, prior: WeightPrior | None = None) -> Critic:
    """The critic for sampling `model` at cfg's setting: cfg.critic_fields fields per class drawn from it, told
    apart from the run's training fields (nefgpt.critic). Its draw and training have fixed seeds (critic.SEED),
    apart from the samples' stream, so every sample seed shares one critic."""
    codes, labels = training_codes(run_dir, tok, tok.spec.num_params, "sample.critic_fields > 0", "critic_fields 0")
    fake_cfg = copy.copy(cfg)
    fake_cfg.n_per_class, fake_cfg.seed, fake_cfg.critic_fields = cfg.critic_fields, SEED, 0
    fake, fake_labels, _ = draw(model, tok.vocab, tok.spec.num_params, trained, fake_cfg, None, where, progress, prior)
    critic = train_critic(tok.decode(codes), labels, tok.decode(fake), fake_labels, tok.vocab.num_classes,
                          cfg.critic_quantile, tok.decode, seed=0, progress=progress)
    critic.info.update(tokenizer_id=tok.id, model_id=model_id, critic_fields=cfg.critic_fields,
                       setting={k: getattr(cfg, k) for k in SAMPLING_KEYS})
    return critic


def run_critic(model: GPT, tok: Tokenizer, trained: dict, cfg: SampleConfig, run_dir: Path, progress: bool = False,
               prior: WeightPrior | None = None, save: bool = True) -> Critic:
    """The run's critic.safetensors when it matches this sampling (critic_matches), else a new one (saved
    there when `save`)."""
    path, model_id = run_dir / CRITIC_FILE, model_fingerprint(model)
    if path.exists():
        saved = load_critic(path, tok.decode)
        if critic_matches(saved, tok.id, model_id, cfg):
            return saved
    critic = fit_critic(model, model_id, tok, trained, cfg, run_dir, str(run_dir / CKPT_FILE), progress, prior)
    if save:
        save_critic(path, critic)
    return critic


def run_sample(cfg: SampleConfig, run_dir: Path, progress: bool = True, labels: list[int] | None = None) -> dict:
    tok = load_tokenizer(run_dir / TOKENIZER_FILE)
    vocab, spec, tok_id = tok.vocab, tok.spec, tok.id
    # Checked before the model loads too (draw checks again), so a bad setting is refused first.
    check_sampling(**{k: getattr(cfg, k) for k in SAMPLING_KEYS}, num_codes=vocab.num_codes)
    model, ckpt = load_checked_model(run_dir, vocab, spec, tok_id)
    prior = (run_prior(run_dir, tok, cfg.prior_components, cfg.prior_dims, cfg.prior_positions)
             if cfg.prior_weight > 0 else None)
    trained = trained_config(ckpt)
    critic = run_critic(model, tok, trained, cfg, run_dir, progress, prior) if cfg.critic_fields > 0 else None
    t0 = time.perf_counter()
    tokens, all_labels, conditioned = draw(model, vocab, spec.num_params, trained, cfg, labels,
                                           str(run_dir / CKPT_FILE), progress, prior, critic)
    meta = {"tokenizer_id": tok_id, "sampling": vars(cfg).copy(), "conditioned": conditioned,
            "critic": None if critic is None else {**critic.info, "kept_fraction": critic.kept_fraction},
            "seconds_per_field": (time.perf_counter() - t0) / max(len(all_labels), 1)}
    save_samples(run_dir, spec, tok.decode(tokens), all_labels, meta,
                 extra={"tokens": tokens.to(torch.int16)}, per_row=min(cfg.n_per_class, 10))
    return {"n": len(all_labels), "sampling": vars(cfg).copy(), "conditioned": conditioned}
