"""A decoder-only GPT over weight tokens, in the spirit of nanoGPT's model.py.

Differences from nanoGPT, and why:
- ``head_dim`` is independent of ``n_embd``: the talk's 12 heads at width 64
  don't divide evenly, so attention projects to ``n_head * head_dim`` and back.
- The output head only scores codebook tokens (``num_codes`` logits, tied to the
  first rows of the token embedding). Targets are always codes, so SOS and class
  tokens can never be produced at a weight position, by construction.
- An optional key/value cache makes sampling incremental.

Levers for learning the weight distribution, each off by default, so a config
without them (an older checkpoint's too) builds exactly the plain model:
- ``class_embed``: a class embedding (the classes, then the null class) added at
  every position, so the condition needn't travel through attention from token 1.
- ``pos_bias``: a learned logit bias per position ("position"), or per class and
  position ("class"): the per-position marginals as direct, decayed parameters.
- ``value_embed``: Fourier features of each code's (standardized) value through a
  linear map, added to the code's embedding, which is also the tied output head:
  codes of nearby values start alike and share what they learn.
- ``struct_pos``: embeddings of each position's place in the field (layer, output
  neuron, input neuron, kind), summed and added to the learned positions.
Each lever's tables start at zero and draw no random numbers, so a fresh model
with levers computes exactly what the plain model of the same seed computes and
A/B runs differ only by what the levers learn. (Their gradients don't depend on
their own values, so a zero start doesn't stall them.)

The class-dependent levers read the class from token 1 (C(c) -> row c; SOS, the
null class, -> the last row). Position 0 comes before it and always gets the
null row, which keeps the model causal; a KV cache keeps the class rows once it
has seen token 1, for the incremental steps after it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

POS_BIAS_MODES = ("none", "position", "class")
VALUE_FREQS = 8  # value_embed: sin and cos at pi/8 .. 16 pi radians per codebook std


@dataclass
class GPTConfig:
    block_size: int = 563
    vocab_size: int = 256
    num_codes: int = 245
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    head_dim: int = 0  # 0 means n_embd // n_head
    dropout: float = 0.0
    bias: bool = True
    # The levers (module docstring); keys a checkpoint lacks default to off.
    class_embed: bool = False
    pos_bias: str = "none"  # none | position | class
    value_embed: bool = False
    struct_pos: bool = False
    field_sizes: tuple[int, ...] = ()  # struct_pos: the field MLP's layer widths, input to output

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}; set head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.pos_bias not in POS_BIAS_MODES:
            raise ValueError(f"pos_bias must be one of {', '.join(POS_BIAS_MODES)}, got {self.pos_bias!r}")
        self.field_sizes = tuple(int(s) for s in self.field_sizes)  # a list (e.g. from JSON) compares equal
        if self.struct_pos:
            sizes = self.field_sizes
            weights = sum(o * i + o for i, o in zip(sizes[:-1], sizes[1:]))
            if len(sizes) < 2 or min(sizes) < 1 or weights + 2 != self.block_size:
                raise ValueError(f"struct_pos needs field_sizes of a field with block_size - 2 = {self.block_size - 2} "
                                 f"weights, got {sizes}")

    @property
    def num_classes(self) -> int:
        """Class tokens follow the codes and SOS in the vocabulary (codebook.Vocab)."""
        return self.vocab_size - self.num_codes - 1

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding."""

    def __init__(self, cfg: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.cls: torch.Tensor | None = None  # (B,) class rows, once token 1 was seen (class-dependent levers)


def struct_indices(sizes: tuple[int, ...]) -> torch.Tensor:
    """(4, P + 2): layer, output neuron, input neuron and kind of each sequence position.

    The order is field.flatten's: per layer W (out x in, row-major), then b, after SOS and the class token.
    kind is 0 weight, 1 bias, 2 SOS, 3 class; what a position lacks (a bias's input neuron, all three for
    SOS and the class token) takes the index after the last real one.
    """
    n_layers, max_out, max_in = len(sizes) - 1, max(sizes[1:]), max(sizes[:-1])
    rows = [(n_layers, max_out, max_in, 2), (n_layers, max_out, max_in, 3)]
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        rows += [(layer, o, i, 0) for o in range(fan_out) for i in range(fan_in)]
        rows += [(layer, o, max_in, 1) for o in range(fan_out)]
    return torch.tensor(rows, dtype=torch.long).T


def _zero_embedding(num: int, dim: int) -> nn.Embedding:
    return nn.Embedding.from_pretrained(torch.zeros(num, dim), freeze=False)  # no reset_parameters: no RNG draws


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        inner = cfg.n_head * cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * inner, bias=cfg.bias)
        self.c_proj = nn.Linear(inner, cfg.n_embd, bias=cfg.bias)
        self.n_head, self.head_dim, self.layer = cfg.n_head, cfg.head_dim, layer
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.n_head * self.head_dim, dim=2)
        q, k, v = (z.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            cache.k[self.layer, :, :, start : start + t] = k
            cache.v[self.layer, :, :, start : start + t] = v
            k = cache.k[self.layer, :, :, : start + t]
            v = cache.v[self.layer, :, :, : start + t]
        # A single new token may see every cached position; a block starting at 0 is plain causal.
        if t > 1 and start > 0:
            raise ValueError("the cache takes a multi-token block only at position 0")
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=t > 1
        )
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections keeps deep stacks stable at start.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        # The levers come last and start at zero (see the module docstring).
        rows = cfg.num_classes + 1  # the classes, then the null class
        if cfg.class_embed:
            self.cls_emb = _zero_embedding(rows, cfg.n_embd)
        if cfg.pos_bias != "none":
            per_class = (rows,) if cfg.pos_bias == "class" else ()
            self.pos_bias = nn.Parameter(torch.zeros(*per_class, cfg.block_size, cfg.num_codes))
        if cfg.value_embed:
            # The codebook's values (run_train copies them in): a buffer, so the checkpoint keeps them.
            self.register_buffer("code_values", torch.linspace(-1.0, 1.0, cfg.num_codes))
            self.value_proj = nn.Parameter(torch.zeros(cfg.n_embd, 2 * VALUE_FREQS))
        if cfg.struct_pos:
            idx = struct_indices(cfg.field_sizes)
            self.register_buffer("struct_idx", idx, persistent=False)  # derived from the config: not saved
            self.struct_emb = nn.ModuleList(_zero_embedding(int(row.max()) + 1, cfg.n_embd) for row in idx)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Code logits (B, T, num_codes) for tokens idx (B, T) at positions start .. start+T-1."""
        c = self.config
        t = idx.shape[1]
        if start + t > c.block_size:
            raise ValueError(f"sequence of {start + t} exceeds block size {c.block_size}")
        pos = torch.arange(start, start + t, device=idx.device)
        emb = self.token_embeddings()
        x = F.embedding(idx, emb) + self.wpe(pos)
        if c.struct_pos:
            x = x + sum(table(rows[pos]) for table, rows in zip(self.struct_emb, self.struct_idx))
        cls = self.position_classes(idx, start, cache) if c.class_embed or c.pos_bias == "class" else None
        if c.class_embed:
            x = x + self.cls_emb(cls)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cache, start)
        x = self.ln_f(x)
        # Tied output head restricted to code tokens: specials are never predicted.
        logits = F.linear(x, emb[: c.num_codes])
        if c.pos_bias == "position":  # the row of input position p biases its prediction, token p + 1
            logits = logits + self.pos_bias[pos]
        elif c.pos_bias == "class":
            logits = logits + self.pos_bias[cls, pos]
        return logits

    def token_embeddings(self) -> torch.Tensor:
        """(vocab_size, n_embd) input embeddings; the first num_codes rows are also the output head."""
        if not self.config.value_embed:
            return self.wte.weight
        v = self.code_values
        u = (v - v.mean()) / v.std(correction=0).clamp_min(1e-8)  # standardized: the frequencies suit any codebook
        freqs = math.pi * 2.0 ** torch.arange(-3, VALUE_FREQS - 3, device=v.device, dtype=v.dtype)
        ang = u[:, None] * freqs
        k = self.config.num_codes  # specials have no value: their rows stay as they are
        return torch.cat([self.wte.weight[:k] + F.linear(torch.cat([ang.sin(), ang.cos()], 1), self.value_proj),
                          self.wte.weight[k:]])

    def position_classes(self, idx: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        """(B, T) class row of each position: token 1's class from position 1 on, the null row before it."""
        c = self.config
        b, t = idx.shape
        null = c.num_classes
        if start <= 1 < start + t:
            token = idx[:, 1 - start]
            cls = torch.where(token > c.num_codes, token - (c.num_codes + 1), null)  # C(c) -> c; SOS -> null
            if cache is not None:
                cache.cls = cls
        elif start == 0:  # only SOS so far
            cls = idx.new_full((b,), null)
        elif cache is not None and cache.cls is not None:
            cls = cache.cls
        else:
            raise ValueError("class_embed / pos_bias = class need token 1: a sequence from 0 or a cache that saw it")
        pos = torch.arange(start, start + t, device=idx.device)
        return torch.where(pos >= 1, cls[:, None], null)

    def flops_per_token(self) -> float:
        """Approximate training FLOPs per token (forward + backward), after the PaLM appendix.

        Only matmul weights count: the position, class, structure and bias tables are lookups, and the value
        map runs once per forward, not per token.
        """
        c = self.config
        lookups = ("wpe.", "cls_emb.", "struct_emb.", "pos_bias", "value_proj")
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith(lookups))
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size

    def configure_optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float],
                            pos_bias_decay: float = 0.0, pos_bias_lr_mult: float = 1.0) -> torch.optim.Optimizer:
        """AdamW with decoupled decay on matrices and tables; the logit bias has its own decay, pos_bias_decay.

        It goes in a third group only when the model has one, so a plain model's optimizer state keeps its two.
        That group's learning rate is pos_bias_lr_mult times the schedule's ("lr_mult", read by the training
        loop): Adam moves each entry by about lr per step, and at the shared lr a log-marginal of several nats
        takes most of a short CPU budget to learn.
        """
        named = list(self.named_parameters())
        bias = [p for name, p in named if name == "pos_bias"]
        rest = [p for name, p in named if name != "pos_bias"]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        if bias:
            groups.append({"params": bias, "weight_decay": pos_bias_decay, "lr_mult": pos_bias_lr_mult})
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)
