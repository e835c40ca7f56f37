"""Generation with the trained GPT: class-conditioned code tokens, decoded one position at a time.

Decoding is incremental with a key/value cache. Logits are shaped in a fixed
order: classifier-free guidance, then temperature, then top-k, then top-p
(nucleus), then min-p (Nguyen et al. 2024: keep the tokens whose probability,
after temperature, is at least ``min_p`` times the most likely token's; 0 is
off); temperature 0 is greedy. The model only scores codebook tokens, so
special tokens can't appear at weight positions. Sampling uses its own seeded
generator, so it is reproducible.

The null class is the SOS token at the class position, ``[SOS, SOS, w1 ...]``
(the vocabulary has no free token): an unconditional model
(``train.conditioning = "none"``) saw only it, and a model trained with
``train.p_uncond > 0`` saw it in that share of its sequences, which is what
guidance needs: with scale g the next-token logits are
``l_null + g (l_cond - l_null)``, from the conditional and the null-class
sequence decoded together as one batch.

The `sample` and `tune` stages both generate through here.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from .errors import UsageError
from .model import GPT, KVCache
from .codebook import Vocab
from .weight_prior import WeightPrior


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  min_p: float = 0.0) -> torch.Tensor:
    """Logits (B, V) -> probabilities after temperature, top-k, top-p and min-p, in that order."""
    if temperature == 0:
        probs = torch.zeros_like(logits, dtype=torch.float32)
        return probs.scatter_(1, logits.argmax(dim=1, keepdim=True), 1.0)
    raw = logits.float()
    # Shift the maximum to 0 first, so a tiny temperature can't overflow the logits to inf (softmax NaN);
    # the maxima stay exactly 0 even when the temperature rounds to 0 in float32 (0 / 0 would be NaN).
    shifted = raw - raw.amax(dim=1, keepdim=True)
    logits = torch.where(shifted == 0, shifted, shifted / temperature)
    if top_k and top_k < logits.shape[1]:
        # Shifting and scaling keep the order, so top-k picks on the raw values: rounding after the shift or a
        # huge temperature could turn distinct logits into ties and let more than k through.
        kth = raw.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(raw < kth, float("-inf"))
    if top_p < 1.0:
        # Order by the raw logits (the same order, without ties made by rounding), the first maximum first.
        order = raw.sort(dim=1, descending=True, stable=True).indices
        sorted_logits = logits.gather(1, order)
        cum = sorted_logits.softmax(dim=1).cumsum(dim=1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
        drop_sorted = (cum - sorted_logits.softmax(dim=1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0:
        # p_i >= min_p * p_max  <=>  l_i - l_max >= log(min_p) on the tempered logits, whose maximum is exactly 0
        # (renormalizing after top-k / top-p changes no ratio, and both keep the maximum), so the argmax survives.
        logits = logits.masked_fill(logits < math.log(min_p), float("-inf"))
    return logits.softmax(dim=1)


def condition_tokens(labels: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """The token at the class position: C(label), or the null class (SOS) for label -1."""
    labels = labels.long()
    return torch.where(labels < 0, vocab.sos, vocab.class_token(labels.clamp(min=0)))


def check_guidance(value: float, trained: dict, where: str, key: str = "guidance") -> None:
    """Guidance needs a model that learned the null class next to the classes; `trained` is its train config.

    So does the oversample score: ``key = "oversample"`` checks that value by the same rule.
    """
    if value == 1:
        return
    conditioning, p_uncond = trained.get("conditioning", "class"), float(trained.get("p_uncond", 0.0))
    if conditioning != "class" or p_uncond <= 0:
        how = "unconditionally (train.conditioning = none)" if conditioning != "class" else "with train.p_uncond = 0"
        raise UsageError(f"sample.{key} = {value} needs a class-conditional model trained with null-class "
                         f"dropout (train.p_uncond > 0), but {where} was trained {how}; use {key} 1")


@torch.no_grad()
def generate(model: GPT, labels: torch.Tensor, vocab: Vocab, num_weights: int, temperature: float, top_k: int,
             top_p: float, generator: torch.Generator, use_cache: bool = True, guidance: float = 1.0,
             min_p: float = 0.0, prefix: torch.Tensor | None = None, prior: WeightPrior | None = None,
             prior_weight: float = 0.0, prior_gpt_weight: float = 1.0,
             prior_component_draw: str = "posterior") -> torch.Tensor:
    """Code tokens (B, num_weights) for class labels (B,); label -1 is the null class (unconditional).

    With guidance g != 1 the B conditional and B null-class sequences run as one batch of 2B (one cache) and
    each step's logits are ``l_null + g (l_cond - l_null)``, before temperature, top-k, top-p and min-p; both
    halves are then extended with the same sampled token.

    ``prefix`` (B, m) gives the first m tokens (in sequence order) and the model draws only the rest: a field
    completed from given weights, as benchmarks/layer_oracle.py does to find which layer the samples fall short in.

    With ``prior_weight`` > 0, the logits at the prior's positions become ``prior_gpt_weight`` times the
    (guided) logits plus ``prior_weight`` times the class prior's log-probability of each code value
    (nefgpt.weight_prior), before the temperature. ``prior_component_draw = "first"`` draws each field's mixture
    component (from `generator`) before decoding and keeps the field in it.
    """
    return _decode(model, labels, vocab, num_weights, temperature, top_k, top_p, generator, use_cache, guidance,
                   min_p, score=False, prefix=prefix, prior=prior, prior_weight=prior_weight,
                   prior_gpt_weight=prior_gpt_weight, prior_component_draw=prior_component_draw)[0]


@torch.no_grad()
def generate_scored(model: GPT, labels: torch.Tensor, vocab: Vocab, num_weights: int, temperature: float,
                    top_k: int, top_p: float, generator: torch.Generator, guidance: float = 1.0,
                    min_p: float = 0.0, prior: WeightPrior | None = None,
                    prior_weight: float = 0.0, prior_gpt_weight: float = 1.0,
                    prior_component_draw: str = "posterior") -> tuple[torch.Tensor, torch.Tensor]:
    """generate's tokens, and each sequence's class score ``log p(w | c) - log p(w | null)`` (B,).

    The score is the model's own implicit classifier: with the null class as the class marginal it is
    ``log p(c | w) - log p(c)``, so a low score marks a field that fits its class no better than any class.
    It reads the raw logits (before guidance, temperature and the filters), so every setting scores alike;
    the null-class half this needs is the one guidance already runs (at guidance 1 it is run for the score).
    """
    return _decode(model, labels, vocab, num_weights, temperature, top_k, top_p, generator, True, guidance, min_p,
                   score=True, prior=prior, prior_weight=prior_weight, prior_gpt_weight=prior_gpt_weight,
                   prior_component_draw=prior_component_draw)


def _decode(model: GPT, labels: torch.Tensor, vocab: Vocab, num_weights: int, temperature: float, top_k: int,
            top_p: float, generator: torch.Generator, use_cache: bool, guidance: float, min_p: float,
            score: bool, prefix: torch.Tensor | None = None, prior: WeightPrior | None = None,
            prior_weight: float = 0.0, prior_gpt_weight: float = 1.0,
            prior_component_draw: str = "posterior") -> tuple[torch.Tensor, torch.Tensor | None]:
    device = next(model.parameters()).device
    b = labels.shape[0]
    use_prior = prior_weight > 0
    if use_prior and prior is None:
        raise UsageError("sample.prior_weight > 0 needs the run's first-layer prior (nefgpt.weight_prior.run_prior)")
    if use_prior and int(labels.min()) < 0:
        raise UsageError("sample.prior_weight > 0 is a class's density, so it needs class labels, not the null class")
    given = 0 if prefix is None else prefix.shape[1]
    if prefix is not None and (prefix.ndim != 2 or prefix.shape[0] != b or given > num_weights):
        raise ValueError(f"prefix must be ({b}, m <= {num_weights}) tokens, got {tuple(prefix.shape)}")
    cond = condition_tokens(labels, vocab)
    guided = guidance != 1
    paired = guided or score  # run the null-class half beside the conditional one
    if paired:
        cond = torch.cat([cond, torch.full_like(cond, vocab.sos)])
    total = torch.zeros(b, dtype=torch.float64) if score else None

    def mix(logits: torch.Tensor) -> torch.Tensor:
        if not paired:
            return logits
        with_class, null = logits[:b].float(), logits[b:].float()
        return null + guidance * (with_class - null) if guided else with_class

    def add_score(logits: torch.Tensor, nxt: torch.Tensor) -> None:
        logp = torch.log_softmax(logits.float(), dim=1).gather(1, nxt).cpu().double()[:, 0]
        total.add_(logp[:b] - logp[b:])

    seq = torch.stack([torch.full_like(cond, vocab.sos), cond], dim=1).to(device)
    out = torch.empty(seq.shape[0], num_weights, dtype=torch.long, device=device)
    if given:
        out[:, :given] = prefix.long().to(device).repeat(2 if paired else 1, 1)
        if given == num_weights:
            return out[:b], total
        seq = torch.cat([seq, out[:, :given]], dim=1)  # the given tokens are read, never scored
    cache = KVCache(model.config, seq.shape[0], device, next(model.parameters()).dtype) if use_cache else None
    raw = model(seq, cache, 0)[:, -1]
    if use_prior:
        prior_labels = labels.long().cpu()
        state = prior.start(b, prior_labels, generator if prior_component_draw == "first" else None)
        for j in range(min(given, prior.n)):
            prior.observe(prior_labels, state, j, out[:b, j].cpu())
    for i in range(given, num_weights):
        logits = mix(raw)
        if use_prior and i < prior.n:
            log_prior = prior.log_density(prior_labels, state, i).to(logits.device)
            logits = prior_gpt_weight * logits + prior_weight * log_prior
        probs = filter_logits(logits, temperature, top_k, top_p, min_p)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
        if use_prior and i < prior.n:
            prior.observe(prior_labels, state, i, nxt[:b, 0].cpu())
        if paired:
            nxt = nxt.repeat(2, 1)
        if score:
            add_score(raw, nxt)
        out[:, i] = nxt[:, 0]
        if i + 1 == num_weights:
            break
        if use_cache:
            raw = model(nxt, cache, 2 + i)[:, -1]
        else:
            raw = model(torch.cat([seq[:, :2], out[:, : i + 1]], dim=1))[:, -1]
    return out[:b], total


def trained_config(ckpt: dict) -> dict:
    """The train config a checkpoint was made with; {} for a checkpoint that carries none."""
    return ckpt["config"] if isinstance(ckpt.get("config"), dict) else {}


def draw_tokens(model: GPT, labels: torch.Tensor, vocab: Vocab, num_weights: int, setting: dict,
                generator: torch.Generator, batch_size: int, progress: bool = False,
                prior: WeightPrior | None = None) -> torch.Tensor:
    """Code tokens (N, num_weights) for labels (N,) at a sampling setting, generated in batches of batch_size.

    ``setting`` has the SAMPLING_KEYS. With ``oversample`` r > 1, each class draws ceil(r k) candidates
    for its k fields and keeps the k with the highest class score (generate_scored), in the order they were
    drawn: a rejection step by the model's own implicit classifier, which drops the fields that drifted
    away from their class while decoding. Labels must then be classes (>= 0): the null class has no score.
    """
    over = float(setting.get("oversample", 1.0))
    if over == 1:
        cand_labels = labels
    else:
        classes, counts = labels.unique(return_counts=True)
        if int(classes.min()) < 0:
            raise UsageError("sample.oversample > 1 ranks fields by their class, so it needs class labels, "
                             "not the null class (an unconditional model samples with oversample = 1)")
        cand_labels = torch.cat([torch.full((math.ceil(over * int(k)),), int(c), dtype=torch.long)
                                 for c, k in zip(classes, counts)])
    tokens, scores = [torch.zeros(0, num_weights, dtype=torch.long)], []
    for batch in tqdm(cand_labels.split(batch_size), desc="sample", disable=not progress):
        args = (model, batch, vocab, num_weights, setting["temperature"], setting["top_k"], setting["top_p"],
                generator)
        kw = {"guidance": setting["guidance"], "min_p": setting["min_p"], "prior": prior,
              "prior_weight": setting.get("prior_weight", 0.0),
              "prior_gpt_weight": setting.get("prior_gpt_weight", 1.0),
              "prior_component_draw": setting.get("prior_component_draw", "posterior")}
        if over == 1:
            tokens.append(generate(*args, **kw).cpu())
        else:
            t, s = generate_scored(*args, **kw)
            tokens.append(t.cpu())
            scores.append(s)
    tokens = torch.cat(tokens)
    if over == 1:
        return tokens
    scores = torch.cat(scores)
    out = torch.empty(len(labels), num_weights, dtype=torch.long)
    for c in classes.tolist():
        slots = (labels == c).nonzero()[:, 0]
        cands = (cand_labels == c).nonzero()[:, 0]
        best = cands[torch.argsort(scores[cands], descending=True, stable=True)[: len(slots)]]
        out[slots] = tokens[best.sort().values]
    return out
