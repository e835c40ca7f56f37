"""Configuration: one dataclass per stage, TOML presets, command-line overrides.

A preset is a TOML file with one table per stage (``[fit]``, ``[train]`` ...);
keys it leaves out keep the dataclass defaults. A top-level ``base = "cpu"``
(before any table) starts from another preset instead, so the file gives only
what differs: a bare name is a built-in preset, a name ending in .toml a file
(relative to the preset that names it); bases may chain, but not in a cycle.
Overrides use dotted keys, ``--set train.max_iters=500``. Unknown tables or
keys are errors, never ignored.
The resolved configuration is saved as ``config.json`` in the run directory; the
checks of its values are in ``nefgpt.validation``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import UsageError
from .validation import validate


@dataclass
class DataConfig:
    dataset: str = "mnist"  # mnist | fashion-mnist | idx:PATH | npz:PATH
    subset_per_class: int = 0  # 0 keeps every image; >0 draws that many per class first
    heldout_per_class: int = 50
    # Carved from the non-held-out part and kept out of training: `tune` scores sampling settings on it,
    # so the reported held-out numbers are not tuned on.
    tune_per_class: int = 30
    seed: int = 0


@dataclass
class FitConfig:
    octaves: int = 4
    hidden: list[int] = field(default_factory=lambda: [16, 16])
    init: str = "shared"  # shared: start every field from one fitted anchor field; random: fresh init each
    steps: int = 200
    lr: float = 3e-2
    init_l2: float = 0.0  # L2 pull of each field toward its init (the anchor): weights the image ignores stay put
    # Extra training fields: each training image shifted by one pixel in this many of the 8 directions (0..8),
    # fitted like the others and appended to nefs.safetensors. Only the models train on them; the tuning and
    # held-out fields, the classifier and the near-copy check keep the real images.
    augment_shifts: int = 0
    anchor_steps: int = 3000
    anchor_lr: float = 3e-3
    batch_size: int = 64  # fields fitted together; small batches stay in cache and run faster
    chunk_size: int = 500  # fields written together; the unit of resume
    seed: int = 0


@dataclass
class TokenizerConfig:
    num_codes: int = 245
    init: str = "quantile"  # quantile | random
    max_iters: int = 300
    dead_fraction: float = 0.05  # a code used less than this fraction of the mean usage is reassigned
    tol: float = 1e-7  # stop when the relative MSE improvement falls below this
    seed: int = 0
    # What the codebook quantizes: none = the raw weights; raw = offsets w - anchor from the shared anchor field;
    # position / layer = those offsets divided by their std over the training fields, per weight position or per
    # parameter tensor (W1, b1, W2, ...). Offsets need fit.init = shared (random-init fields have no shared anchor).
    # pca = the training fields' principal components, whitened, largest variance first: position i of the
    # sequence is then component i, so the first tokens set the coarse shape of the whole field.
    offsets: str = "none"  # none | raw | position | layer | pca
    # The weights' order in the sequence: input_first = the flatten order W1, b1, W2, ...; output_first = the layers
    # reversed, so the first layer, which decides whether a sample is readable, is decoded last, given the others.
    order: str = "input_first"  # input_first | output_first


@dataclass
class TrainConfig:
    # Not the cpu preset's values, on purpose: from_dict fills a key missing from an older config.json from here,
    # so each default must reproduce older runs (levers off, no time budget). The tuned values are in
    # presets/cpu.toml; tests/data/preset_snapshots.json pins every preset's resolved values.
    model: str = "gpt"  # gpt | regression | diffusion | gaussian | copy_noise | marginals | mixture (nefgpt.baselines)
    conditioning: str = "class"  # class: [SOS, C(label), w...]; none: unconditional
    p_uncond: float = 0.0  # share of training sequences whose class token is replaced by the null class (for guidance)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    head_dim: int = 0  # 0 means n_embd // n_head; set it to decouple head count from width
    dropout: float = 0.0
    # A moving average of the weights (nefgpt.ema) that sample and tune use; 0 = off, the raw weights.
    ema_decay: float = 0.0
    bias: bool = True
    # Levers for learning the weight distribution (see nefgpt.model), all off by default:
    class_embed: bool = False  # a learned class embedding (classes + null class) added at every position
    pos_bias: str = "none"  # none | position | class: a learned logit bias per weight position (and per class)
    # Decoupled decay of that bias (its own AdamW group). Adam moves an entry pushed one way (a code never seen at a
    # position) by about lr per step, so the decay bounds it near 1 / pos_bias_decay nats (0.1: ~10).
    pos_bias_decay: float = 0.1
    # The bias's learning rate as a multiple of train.lr (see GPT.configure_optimizer).
    pos_bias_lr_mult: float = 1.0
    value_embed: bool = False  # add Fourier features of each code's value to its embedding (and tied head)
    # HL-Gauss targets: a Gaussian of this width (code indices) around the target code; 0 = one-hot. val_loss and
    # train_loss stay the plain cross-entropy; only the per-step log has this one.
    hl_sigma: float = 0.0
    # The training loss counts each token of the field's first layer (W1, b1) this many times; 1 = the plain mean.
    first_layer_weight: float = 1.0
    struct_pos: bool = False  # add embeddings of each weight's layer, output neuron, input neuron and kind
    batch_size: int = 32
    max_iters: int = 2000
    # Wall-clock budget of the training loop in minutes (0 = none: exactly max_iters iterations, bit-reproducible).
    # Training stops at whichever budget runs out first, and the LR schedule follows the faster of the two.
    max_minutes: float = 0.0
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup_iters: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250
    ckpt_interval: int = 250
    dtype: str = "auto"  # auto | bf16 | fp32; auto uses bf16 autocast where the hardware supports it
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False
    seed: int = 0


@dataclass
class SampleConfig:
    # Use the setting `nefgpt tune` chose (tune.json) when the run has one; false turns it off entirely.
    use_tuned: bool = True
    # The sampling keys given by hand (--temperature ... or --set sample.<key>) keep their value; the tuned setting
    # fills in the others. Saved in config.json; `--set sample.use_tuned=true` clears it (the whole tuned setting).
    explicit: list[str] = field(default_factory=list)
    n_per_class: int = 50
    temperature: float = 1.0
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1.0 disables nucleus filtering
    min_p: float = 0.0  # keep tokens with probability >= min_p x the top token's (after temperature); 0 disables it
    guidance: float = 1.0  # classifier-free guidance scale: 1 is plain conditional sampling
    # Draw this many candidates per field and keep, per class, those with the highest log p(w | c) - log p(w | null)
    # (nefgpt.generate.draw_tokens). 1 is off; > 1 needs train.p_uncond > 0 and that many times the sampling time.
    oversample: float = 1.0
    # Adds this many times a per-class prior's log-probability of each code value to the logits at the prior's
    # positions (nefgpt.weight_prior, fitted on the run's training tokens); 0 is off.
    prior_weight: float = 0.0
    # The prior: a mixture of prior_components Gaussians per class in the class's leading prior_dims principal
    # directions; 1 and 0 is one Ledoit-Wolf Gaussian on all the first layer's positions.
    prior_components: int = 1
    prior_dims: int = 0
    # The GPT's logits count this much at the prior's positions: 1 is the plain product of the two, 0 leaves
    # those positions to the prior alone.
    prior_gpt_weight: float = 1.0
    # The positions the prior covers: first_layer (W1 and b1) or all (every weight, one density per class).
    prior_positions: str = "first_layer"
    # posterior: the components' weights follow the decoded values (the GPT's pull moves fields between them);
    # first: each field draws its component by its weight before decoding and stays in it (every style stays).
    prior_component_draw: str = "posterior"
    # Rejection by a critic (nefgpt.critic): fields per class drawn to train it (0 is off), and the class's quantile
    # of its logits above which every candidate is kept.
    critic_fields: int = 0
    critic_quantile: float = 0.5
    batch_size: int = 250
    seed: int = 0


@dataclass
class TuneConfig:
    """`nefgpt tune`: search sampling settings, scored against the tuning split."""
    # 12 settings of 300 samples: about 4 minutes on 2 CPU cores with the cpu preset. The grid spans the
    # README's "Sampling settings" table: no top-k (diverse, ~60 % readable) to top-k 3 (~95 %, least diverse).
    temperatures: list[float] = field(default_factory=lambda: [0.8, 1.0])
    top_ks: list[int] = field(default_factory=lambda: [0, 3, 6])
    top_ps: list[float] = field(default_factory=lambda: [1.0, 0.9])
    # Classifier-free guidance scales; values other than 1 need a model trained with train.p_uncond > 0.
    guidances: list[float] = field(default_factory=lambda: [1.0])
    min_ps: list[float] = field(default_factory=lambda: [0.0])  # min-p thresholds; 0 is off
    oversamples: list[float] = field(default_factory=lambda: [1.0])  # sample.oversample values; 1 is off
    prior_weights: list[float] = field(default_factory=lambda: [0.0])  # sample.prior_weight values; 0 is off
    prior_components: list[int] = field(default_factory=lambda: [1])  # sample.prior_components values
    prior_dims: list[int] = field(default_factory=lambda: [0])  # sample.prior_dims values
    prior_gpt_weights: list[float] = field(default_factory=lambda: [1.0])  # sample.prior_gpt_weight
    prior_positions: list[str] = field(default_factory=lambda: ["first_layer"])  # sample.prior_positions
    prior_component_draws: list[str] = field(default_factory=lambda: ["posterior"])  # sample.prior_component_draw
    search: str = "grid"  # grid | random
    budget: int = 0  # at most this many settings (random search draws them); 0 = the whole grid
    # Wall-clock budget in minutes (0 = none): settings are tried in order, none starts after it (one always
    # does), and the best of those tried wins; so the result depends on the machine (search = random: a random subset).
    max_minutes: float = 0.0
    # See nefgpt.objectives.OBJECTIVES: nna_gap |1-NNA - 0.5|; mmd; cov (maximized); accuracy (maximized);
    # diversity |1 - within-class diversity ratio|; balanced |1-NNA - 0.5| + |1 - diversity ratio|.
    objective: str = "nna_gap"
    min_accuracy: float = 0.9  # settings below this classifier accuracy are not eligible
    # When no setting reaches min_accuracy: the objective still decides, among the settings within this much of
    # the best accuracy. 0 (the default, as older runs chose) takes the most accurate setting.
    fallback_margin: float = 0.0
    n_per_class: int = 30
    # Fields drawn per class when above n_per_class: accuracy and diversity, which choose, read all of them (fewer
    # read noisier, and the winner reads high); MMD, COV and 1-NNA the first n_per_class. 0 = n_per_class.
    samples_per_class: int = 0
    seed: int = 0


@dataclass
class DiffusionConfig:
    """The weight-space DDPM baseline (train.model = "diffusion"), HyperDiffusion-style.

    Weights are standardized per position over the training fields; an MLP of residual
    blocks predicts x0 from (x_t, t, class). The default size has 7.2 M parameters; one
    iteration (batch 256, bf16 autocast) measured 70-92 ms on one thread of this 2-core
    CPU while it was shared with other jobs, so 10 000 iterations take 12-15 min (sampling
    500 fields with 100 DDIM steps: ~7 s). For a hard budget set max_minutes.
    """
    width: int = 512
    n_blocks: int = 4
    dropout: float = 0.0
    timesteps: int = 1000  # training steps of the cosine schedule
    p_uncond: float = 0.1  # share of training fields given the null class, for classifier-free guidance
    batch_size: int = 256
    max_iters: int = 10000
    # Wall-clock cap (0 = none). When set, the LR schedule runs on whichever budget is used up
    # faster, so a capped run still ends at the minimum LR (but is then not bit-reproducible).
    max_minutes: float = 0.0
    lr: float = 1e-3
    min_lr_frac: float = 0.1
    warmup_iters: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_interval: int = 250
    ckpt_interval: int = 500
    eval_timesteps: int = 8  # the held-out loss scores every field at this many fixed, evenly spread timesteps
    sample_steps: int = 100  # DDIM steps
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 DDPM-like
    clip_x0: float = 0.0  # clamp predicted x0 to +-this many stds at each step; 0 = off
    dtype: str = "auto"  # auto | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0


@dataclass
class RegressionConfig:
    """The regression-transformer baseline (train.model = "regression"); its backbone uses [train]'s sizes."""
    loss: str = "mse"  # mse | l1, on per-position standardized weights
    # Sampling: Gaussian noise of this many residual stds (per position, measured on training fields) added at
    # each step; 0 is the plain deterministic regressor (one field per class), the faithful baseline.
    noise: float = 0.0
    residual_fields: int = 1024  # training fields used to estimate the residual stds after training


@dataclass
class BaselineConfig:
    """The simple baselines: per-class Gaussian, mixture of Gaussians, and copy + noise."""
    covariance: str = "full"  # gaussian: full | diag
    # gaussian, full: weight of the diagonal target in (1 - a) S + a diag(S); -1 estimates it per class
    # (Ledoit-Wolf): with ~420 fields per class and 561 weights S alone is singular.
    shrinkage: float = -1.0
    # copy_noise: noise std relative to each position's std over the training fields; -1 chooses it from
    # noise_scales by the 1-NNA gap |1-NNA - 0.5| against the tuning split.
    noise_scale: float = -1.0
    noise_scales: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    # mixture: Gaussians per class, in that many leading principal directions of the class's fields (16 x 128
    # sampled best of 4 x 32, 8 x 64 and 16 x 128 on machine A: docs/results.md, "A mixture prior")
    components: int = 16
    dims: int = 128
    seed: int = 0


@dataclass
class EvalConfig:
    classifier_epochs: int = 8
    classifier_batch_size: int = 64
    classifier_lr: float = 3e-3
    seed: int = 0


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    tokenize: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS = ("cpu", "seed", "fashion")


def preset_path(name: str) -> Path:
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"preset file {name}: not found")
        return path
    if name not in PRESETS:
        raise UsageError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)} or give a .toml path)")
    return Path(str(resources.files("nefgpt") / "presets" / f"{name}.toml"))


def load_preset(name: str) -> RunConfig:
    """A built-in preset or a .toml file, its ``base`` chain applied first (each file's errors name that file)."""
    cfg = RunConfig()
    for tables, source in _preset_chain(preset_path(name), ()):
        from_dict(tables, source=source, base=cfg)
    return cfg


def _preset_chain(path: Path, seen: tuple[Path, ...]) -> list[tuple[dict[str, Any], str]]:
    """[(tables, source)] from the root base down to ``path``; ``seen`` are the files that named it."""
    try:
        tables = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML ({exc})") from None
    base = tables.pop("base", None)
    if base is None:
        return [(tables, str(path))]
    if not isinstance(base, str):
        raise UsageError(f"{path}: base must be a preset name ({', '.join(PRESETS)}) or a .toml path, got {base!r}")
    try:  # a .toml base is relative to the file that names it (an absolute path stays as it is)
        base_path = preset_path(str(path.parent / base) if base.endswith(".toml") else base)
    except UsageError as exc:
        raise UsageError(f"{path}: base = {base!r}: {exc}") from None
    chain = (*seen, path)
    if base_path.resolve() in {p.resolve() for p in chain}:
        raise UsageError(f"{path}: base = '{base}' makes a cycle ({' -> '.join(str(p) for p in (*chain, base_path))})")
    return _preset_chain(base_path, chain) + [(tables, str(path))]


def from_dict(tables: dict[str, Any], source: str, base: RunConfig | None = None) -> RunConfig:
    cfg = base if base is not None else RunConfig()
    for section, values in tables.items():
        if not isinstance(values, dict):
            raise UsageError(f"{source}: '{section}' must be a table of settings")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value, source)
    return cfg


def set_value(cfg: RunConfig, dotted: str, value: Any, source: str) -> None:
    section, _, key = dotted.partition(".")
    stage = getattr(cfg, section, None) if section in _sections() else None
    if stage is None or not key:
        raise UsageError(f"{source}: unknown setting '{dotted}' (sections: {', '.join(_sections())})")
    hints = get_type_hints(type(stage))
    if key not in hints:
        raise UsageError(f"{source}: unknown setting '{dotted}' (known: {', '.join(hints)})")
    setattr(stage, key, _coerce(value, hints[key], dotted, source))


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` strings; values are parsed as TOML, falling back to a bare string."""
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item}: expected section.key=value")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        set_value(cfg, dotted.strip(), value, f"--set {item}")
    validate(cfg)
    return cfg


def _coerce(value: Any, hint: Any, dotted: str, source: str) -> Any:
    origin = getattr(hint, "__origin__", hint)
    ok = (
        (origin is bool and isinstance(value, bool))
        or (origin is int and isinstance(value, int) and not isinstance(value, bool))
        or (origin is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (origin is str and isinstance(value, str))
        or (origin is list and isinstance(value, list) and all(_is_of(v, _item_type(hint)) for v in value))
    )
    if ok and origin is list and _item_type(hint) is float:
        return [float(v) for v in value]
    if not ok:
        raise UsageError(f"{source}: '{dotted}' must be of type {getattr(origin, '__name__', origin)}, got {value!r}")
    return float(value) if origin is float else value


def _item_type(hint: Any) -> type:
    args = getattr(hint, "__args__", (int,))
    return args[0]


def _is_of(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]
