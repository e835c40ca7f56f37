"""The training log every model writes: the CSV rows (one loss figure serves all) and TensorBoard scalars."""

from __future__ import annotations

import csv
from pathlib import Path

from .artifacts import atomic_path
from .layout import TB_DIR

LOG_COLUMNS = ("iter", "lr", "train_loss", "val_loss", "tokens_per_s", "elapsed_s")


class Scalars:
    """TensorBoard scalars in RUN/tb when tensorboard is installed; nothing otherwise (the CSV log is always written).

    The writer opens at the first value, so a run that fails before its first step leaves no tb/ behind.
    On resume, events after the checkpoint's iteration (from the interrupted run) are purged.
    """

    def __init__(self, run_dir: Path, start_iter: int) -> None:
        self.path, self.start, self.writer = run_dir / TB_DIR, start_iter, None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # not installed, or an incompatible install: CSV only
            self.cls = None
        else:
            self.cls = SummaryWriter

    def add(self, step: int, values: dict[str, float]) -> None:
        if self.cls is None:
            return
        if self.writer is None:
            self.writer = self.cls(str(self.path), purge_step=self.start + 1 if self.start else None)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def append_log(path: Path, row: list) -> None:
    """One row of the training CSV log (every model writes these columns, so one loss figure serves all)."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(LOG_COLUMNS)
        writer.writerow(row)


def truncate_log(path: Path, upto: int) -> None:
    """Drop log rows written after the checkpoint we resume from."""
    if not path.exists():
        return
    rows = list(csv.reader(path.open()))
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= upto]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        csv.writer(f).writerows(kept)
