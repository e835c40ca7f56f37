"""Which layer do the GPT's samples fall short in? Give it real weights for some layers and let it draw the rest.

For 50 training fields per class (seeded), the trained GPT of `--run` decodes:
- everything (an ordinary sample, for reference);
- everything after the first layer, the first layer (W1, b1) given from the training field;
- with `--output-first RUN2` (a run trained with `tokenize.order = output_first`, on the same fields): the
  first layer only, every other layer given;
- nothing (the training fields themselves, tokenized: the ceiling of this protocol).
Each set is scored by the `evaluate` stage against the run's held-out fields (accuracy, MMD, COV, 1-NNA,
within-class diversity, near-copy rate), in a scratch copy of the run directory, and printed side by side.
The given weights come from training fields, so a row that copies them closely shows up in the near-copy rate.

    python benchmarks/layer_oracle.py --run runs/demo [--output-first runs/output_first] [--guidance 1]
        [--temperature 1] [--json docs/layer_oracle.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from nefgpt.checkpoint import load_checked_model
from nefgpt.codebook import Tokenizer, load_tokenizer, load_tokens
from nefgpt.artifacts import load_json
from nefgpt.config import from_dict
from nefgpt.evaluate import run_evaluate
from nefgpt.generate import generate
from nefgpt.layout import CLASSIFIER_FILE, CONFIG_FILE, NEFS_FILE, SPLIT_FILE, TOKENIZER_FILE
from nefgpt.samples_io import save_samples
from nefgpt.split import load_split

PER_CLASS = 50
BATCH = 250


def training_picks(run: Path, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """PER_CLASS training-field indices of each class, drawn with `seed`."""
    train = torch.tensor(load_split(run)["train"], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels[train].unique().tolist():
        of_class = train[labels[train] == c]
        picks.append(of_class[torch.randperm(len(of_class), generator=g)[:PER_CLASS]])
    return torch.cat(picks)


def complete(run: Path, pick: torch.Tensor, given: int, guidance: float, temperature: float,
             seed: int) -> tuple[Tokenizer, torch.Tensor, torch.Tensor]:
    """The run's model completes the tokens of training fields `pick` after their first `given` tokens."""
    tok = load_tokenizer(run / TOKENIZER_FILE)
    tokens, labels = load_tokens(run, tok.id)
    model, _ = load_checked_model(run, tok.vocab, tok.spec, tok.id)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = [generate(model, lab, tok.vocab, tok.spec.num_params, temperature, 0, 1.0, gen, guidance=guidance,
                    prefix=prefix[:, :given])
           for lab, prefix in zip(labels[pick].split(BATCH), tokens[pick].split(BATCH))]
    return tok, torch.cat(out), labels[pick]


def score(run: Path, tok: Tokenizer, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
    """The evaluate stage's measures of these fields, in a scratch copy of the run's data and classifier."""
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for name in (SPLIT_FILE, NEFS_FILE, CLASSIFIER_FILE):
            if (run / name).exists():
                shutil.copy(run / name, scratch / name)
        save_samples(scratch, tok.spec, tok.decode(tokens), labels, {"tokenizer_id": tok.id, "conditioned": True},
                     extra={"tokens": tokens.to(torch.int16)}, per_row=10)
        cfg = from_dict(load_json(run / CONFIG_FILE), str(run / CONFIG_FILE)).evaluate  # the run's own settings
        m = run_evaluate(cfg, scratch, progress=False)
    return {"accuracy": m["accuracy"], "mmd": m["mmd"], "cov": m["cov"], "1nna": m["1nna"],
            "diversity_ratio": m["diversity_ratio"], "near_copy_rate": m["novelty"]["near_copy_rate"],
            "ceiling_1nna": m["ceiling"]["1nna"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a trained run (input_first order)")
    ap.add_argument("--output-first", type=Path, help="a run on the same fields with tokenize.order = output_first")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    labels = load_tokens(args.run, load_tokenizer(args.run / TOKENIZER_FILE).id)[1]
    pick = training_picks(args.run, labels, args.seed)
    spec = load_tokenizer(args.run / TOKENIZER_FILE).spec
    first = spec.layer_params[0]
    rows = [("model draws every layer", args.run, 0), ("first layer given, model draws the rest", args.run, first)]
    if args.output_first:
        rows.append(("every other layer given, model draws the first", args.output_first, spec.num_params - first))
    rows.append(("every layer given (the training fields)", args.run, spec.num_params))
    results = []
    print(f"{len(pick)} training fields ({PER_CLASS} per class) vs the held-out fields; guidance {args.guidance:g}, "
          f"T {args.temperature:g}, threads {torch.get_num_threads()}")
    print(f"{'':50} {'accuracy':>8} {'MMD':>7} {'COV':>6} {'1-NNA':>6} {'divers.':>7} {'near-copy':>9} {'s':>5}")
    for name, run, given in rows:
        t0 = time.perf_counter()
        tok, tokens, lab = complete(run, pick, given, args.guidance, args.temperature, args.seed)
        r = {"variant": name, "run": str(run), "given_tokens": given,
             **score(run, tok, tokens, lab), "seconds": time.perf_counter() - t0}
        results.append(r)
        print(f"{name:50} {r['accuracy']:8.1%} {r['mmd']:7.4f} {r['cov']:6.1%} {r['1nna']:6.1%} "
              f"{r['diversity_ratio']:7.3f} {r['near_copy_rate']:9.1%} {r['seconds']:5.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"guidance": args.guidance, "temperature": args.temperature,
                                         "seed": args.seed, "rows": results}, indent=2) + "\n")
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
