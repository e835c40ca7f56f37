"""Rejection by a critic (`sample.critic_fields`): one model and setting, with and without it, side by side.

The critic (nefgpt.critic) is a weight-space discriminator trained to tell the run's training fields from fields
the GPT drew at the setting; candidates are kept with probability min(1, exp(logit - t_c)). For each GPT weight
under the prior (`sample.prior_gpt_weight`; the rest of the setting is the run's tuned one) and each seed, this
draws 50 fields per class plainly and with the critic at each quantile, and scores every set with the `evaluate`
stage's measures against the run's 500 held-out fields (benchmarks/layer_oracle.score).

    python benchmarks/critic.py --run runs/demo [--gpt-weights 0.5,0.6] [--quantiles 0.5] [--critic-fields 150]
        [--seeds 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import nefgpt
from layer_oracle import score
from nefgpt.hardware import describe

PER_CLASS = 50


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a tuned run with the prior (input_first order)")
    ap.add_argument("--gpt-weights", type=_floats, default=None, help="default: the run's tuned one")
    ap.add_argument("--quantiles", type=_floats, default=[0.5])
    ap.add_argument("--critic-fields", type=int, default=150)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    gen = nefgpt.load(args.run)
    weights = args.gpt_weights or [gen.setting["prior_gpt_weight"]]
    print(f"{describe()}; threads {torch.get_num_threads()}; run {args.run}; setting {gen.setting}")
    print(f"{'GPT weight':>10} {'seed':>4} {'critic':>12} {'accuracy':>8} {'MMD':>7} {'COV':>6} {'1-NNA':>6} "
          f"{'divers.':>7} {'near-copy':>9} {'kept':>5} {'s':>5}")
    rows = []
    for a in weights:
        for seed in args.seeds:
            for q in [None, *args.quantiles]:
                t0 = time.perf_counter()
                kw = {} if q is None else {"critic_fields": args.critic_fields, "critic_quantile": q}
                fields = gen.sample(n_per_class=PER_CLASS, seed=seed, prior_gpt_weight=a,
                                    **({"critic_fields": 0} | kw))
                seconds = time.perf_counter() - t0  # with q: the critic's own draw and training, the first time
                m = score(args.run, gen.tokenizer, fields.tokens, fields.labels)
                # the generator keeps one critic per setting and quantile; every seed shares it
                kept = None if q is None else next(c.kept_fraction for c in gen._critics.values()
                                                   if c.info["quantile"] == q
                                                   and c.info["setting"]["prior_gpt_weight"] == a)
                rows.append({"prior_gpt_weight": a, "seed": seed, "critic_quantile": q,
                             "critic_fields": 0 if q is None else args.critic_fields, "kept_fraction": kept,
                             "seconds": seconds, **m})
                label = "off" if q is None else f"q {q:g}"
                print(f"{a:>10g} {seed:>4} {label:>12} {m['accuracy']:>8.1%} {m['mmd']:>7.4f} {m['cov']:>6.1%} "
                      f"{m['1nna']:>6.1%} {m['diversity_ratio']:>7.3f} {m['near_copy_rate']:>9.1%} "
                      f"{'' if kept is None else f'{kept:.0%}':>5} {seconds:>5.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": describe(), "run": str(args.run), "setting": gen.setting,
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
