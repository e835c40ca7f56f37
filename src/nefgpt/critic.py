"""A critic of sampled fields: discriminator rejection sampling in weight space (sample.critic_fields > 0).

At its readable settings the GPT (with the prior) draws fields that sit closer together than real ones: the
within-class diversity and 1-NNA give that away. A small classifier, trained to tell the run's training fields
from fields the GPT drew at the same setting, estimates the log density ratio log p_data(w | c) / p_gpt(w | c)
(its logit). Each candidate is kept with probability min(1, exp(logit - t_c)), which reweights the GPT's
distribution toward the data's (Azadi et al. 2019, "Discriminator rejection sampling"). t_c is the class's
`sample.critic_quantile` of the logits on the critic's own drawn fields: 0.5 keeps every field above the median
and fewer and fewer below it (87 % of the candidates in README command 1 on machine A).

The critic sees the weights, standardized per position, and the class; it never sees a rendered image, so it is
independent of the CNN that scores the samples. It is trained on the training fields' decoded tokens, the
same quantized weights the samples decode to.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .artifacts import load_tensors, save_tensors
from .errors import ArtifactError, UsageError

HIDDEN = 256
EPOCHS = 30  # the best epoch on the held-back tenth is kept; it is usually the 5th to 10th
BATCH = 128
LR, WEIGHT_DECAY, DROPOUT, INPUT_NOISE = 1e-3, 0.1, 0.5, 0.05
CLASS_SCALE = 3.0  # the one-hot class, scaled to stand out beside 561 standardized weights
SEED = 1_000_003  # the critic's own fields draw from this seed, apart from any sample seed's stream
MAX_ROUNDS = 50


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the sampling weights: a saved critic is reused only for the model it was trained against."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _network(num_weights: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(num_weights + num_classes, HIDDEN), nn.GELU(), nn.Dropout(DROPOUT),
                         nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Dropout(DROPOUT), nn.Linear(HIDDEN, 1))


class Critic:
    """The trained discriminator, with its input standardization and per-class acceptance thresholds."""

    def __init__(self, net: nn.Sequential, mean: torch.Tensor, std: torch.Tensor, thresholds: torch.Tensor,
                 info: dict, decode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.net = net.eval()
        self.mean, self.std, self.thresholds = mean, std, thresholds
        self.info = info  # what it was trained against and how well it did (saved as the file's metadata)
        self.decode = decode  # code tokens -> weights: the run's tokenizer's (not saved with the critic)
        self.kept_fraction: float | None = None  # of the candidates, in the last draw_accepted

    @property
    def num_classes(self) -> int:
        return len(self.thresholds)

    def _inputs(self, weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).float() * CLASS_SCALE
        return torch.cat([(weights - self.mean) / self.std, onehot], dim=1)

    @torch.no_grad()
    def logits(self, weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The critic's logit (N,) for fields' weights (N, P) of class labels (N,): high means data-like."""
        return self.net(self._inputs(weights, labels))[:, 0]

    def accept(self, weights: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Which candidates are kept (N,) bool: each with probability min(1, exp(logit - t_class))."""
        keep_p = (self.logits(weights, labels) - self.thresholds[labels]).exp().clamp(max=1.0)
        return torch.rand(len(labels), generator=gen) < keep_p

    def draw_accepted(self, draw: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                      gen: torch.Generator) -> tuple[torch.Tensor, float]:
        """Tokens (N, P) for class labels (N,), each class's slots filled, in order, by the first of its
        candidates the critic keeps; and the fraction of candidates kept. `draw` maps labels to tokens."""
        slots = {c: (labels == c).nonzero()[:, 0] for c in labels.unique().tolist()}
        filled = {c: [] for c in slots}
        rate, drawn, kept = 0.6, 0, 0  # the rate is re-estimated after each round
        for _ in range(MAX_ROUNDS):
            short = {c: len(s) - sum(len(t) for t in filled[c]) for c, s in slots.items()}
            short = {c: k for c, k in short.items() if k > 0}
            if not short:
                self.kept_fraction = kept / max(drawn, 1)
                return _place(labels, slots, filled), self.kept_fraction
            cand = torch.cat([torch.full((math.ceil(k / rate) + 1,), c, dtype=torch.long) for c, k in short.items()])
            tokens = draw(cand)
            ok = self.accept(self.decode(tokens), cand, gen)
            drawn, kept = drawn + len(cand), kept + int(ok.sum())
            rate = max(kept / drawn, 0.05)
            for c, k in short.items():
                filled[c].append(tokens[ok & (cand == c)][:k])
        raise UsageError(f"the critic kept {kept} of {drawn} candidates in {MAX_ROUNDS} rounds; "
                         "lower sample.critic_quantile")


def _place(labels: torch.Tensor, slots: dict, filled: dict) -> torch.Tensor:
    first = next(iter(filled.values()))[0]
    out = torch.empty(len(labels), first.shape[1], dtype=first.dtype)
    for c, s in slots.items():
        out[s] = torch.cat(filled[c])
    return out


def train_critic(real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor, fake_labels: torch.Tensor,
                 num_classes: int, quantile: float, decode: Callable[[torch.Tensor], torch.Tensor], seed: int = 0,
                 progress: bool = False) -> Critic:
    """Train the critic on real fields' weights (N, P) against drawn ones (M, P), with their labels; `decode`
    maps the code tokens it will judge to weights.

    A tenth of the rows is held back; the epoch with the lowest loss there is kept (it overfits after a few
    epochs). The classes are balanced by weighting the real rows by M / N.
    """
    mean, std = real.mean(0), real.std(0) + 1e-6
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _network(real.shape[1], num_classes)
        critic = Critic(net, mean, std, torch.zeros(num_classes), {}, decode)
        x = torch.cat([critic._inputs(real, real_labels), critic._inputs(fake, fake_labels)])
        y = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))])
        pos_weight = torch.tensor(len(fake) / max(len(real), 1))
        order = torch.randperm(len(x))
        held, train = order[: len(x) // 10], order[len(x) // 10:]
        opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        best = (math.inf, None, 0, 0.0)
        for epoch in tqdm(range(1, EPOCHS + 1), desc="critic", disable=not progress):
            net.train()
            for b in train[torch.randperm(len(train))].split(BATCH):
                xb = x[b] + INPUT_NOISE * torch.randn_like(x[b])
                loss = F.binary_cross_entropy_with_logits(net(xb)[:, 0], y[b], pos_weight=pos_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                out = net(x[held])[:, 0]
                held_loss = float(F.binary_cross_entropy_with_logits(out, y[held], pos_weight=pos_weight))
            if held_loss < best[0]:
                accuracy = float(((out > 0).float() == y[held]).float().mean())
                best = (held_loss, {k: v.clone() for k, v in net.state_dict().items()}, epoch, accuracy)
    net.load_state_dict(best[1])
    fake_logits = critic.logits(fake, fake_labels)
    critic.thresholds = torch.stack([torch.quantile(fake_logits[fake_labels == c], quantile)
                                     if bool((fake_labels == c).any()) else torch.tensor(0.0)
                                     for c in range(num_classes)])
    critic.info = {"best_epoch": best[2], "held_loss": best[0], "held_accuracy": best[3],
                   "n_real": len(real), "n_drawn": len(fake), "quantile": quantile}
    return critic


def save_critic(path: Path, critic: Critic) -> None:
    tensors = {f"net.{k}": v for k, v in critic.net.state_dict().items()}
    tensors.update(mean=critic.mean, std=critic.std, thresholds=critic.thresholds)
    save_tensors(path, tensors, critic.info)


def load_critic(path: Path, decode: Callable[[torch.Tensor], torch.Tensor]) -> Critic:
    """A saved critic; `decode` maps code tokens to weights (the run's tokenizer's)."""
    t, info = load_tensors(path)
    try:
        num_weights, num_classes = len(t["mean"]), len(t["thresholds"])
        net = _network(num_weights, num_classes)
        net.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("net.")})
        return Critic(net, t["mean"], t["std"], t["thresholds"], info, decode)
    except (KeyError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: not a critic file ({str(exc).splitlines()[0]})") from None
