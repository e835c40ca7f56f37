"""The run directory's layout: every file name a stage reads or writes, defined once.

A run directory (``--out``) holds one run's artifacts; each stage reads the files of the
stages before it and writes its own. Modules import the names from here, never from
another stage, so renaming a file is a one-line change.
"""

from __future__ import annotations

# Run-wide bookkeeping (cli).
CONFIG_FILE = "config.json"  # the resolved configuration
STAGES_FILE = "stages.json"  # each stage's settings fingerprint
LOCK_FILE = ".nefgpt.lock"  # held while a command writes the run directory

# fit
SPLIT_FILE = "split.json"
NEFS_FILE = "nefs.safetensors"
ANCHOR_FILE = "anchor.safetensors"
CHUNK_DIR = "fit_chunks"  # partial fits, so an interrupted fit resumes by chunk

# tokenize
TOKENIZER_FILE = "tokenizer.safetensors"
TOKENS_FILE = "tokens.safetensors"
PRIOR_FILE = "first_layer_prior.safetensors"  # only in shipped models, which carry no training tokens
TOKENIZER_REPORT_FILE = "tokenizer.json"
TOKENIZER_FIGURE_FILE = "tokenizer.png"

# train (the GPT and every baseline)
CKPT_FILE = "ckpt.pt"
LOG_FILE = "train_log.csv"
SUMMARY_FILE = "train.json"
LOSS_FIGURE_FILE = "loss.png"
TB_DIR = "tb"  # TensorBoard scalars, when tensorboard is installed

# tune
TUNE_FILE = "tune.json"
TUNE_TABLE_FILE = "tune_table.md"
TUNE_HEATMAP_FILE = "tune_heatmap.png"

# sample
SAMPLES_FILE = "samples.safetensors"
IMAGES_FILE = "samples.npz"
GRID_FILE = "samples_grid.png"
CRITIC_FILE = "critic.safetensors"  # with sample.critic_fields > 0: the rejection step's discriminator

# evaluate
METRICS_FILE = "metrics.json"
CLASSIFIER_FILE = "classifier.safetensors"
NEAREST_FILE = "samples_nearest.png"
CONFUSION_FILE = "confusion.png"
GENERATION_FILE = "generation.gif"

# report
REPORT_FILE = "report.html"
