"""The tuning objectives: what each one is, in words, and its score for a setting's metrics (lower is better)."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple


class Objective(NamedTuple):
    """A tuning objective: what it is, in words, and its value for a setting's scores (lower is better)."""

    definition: str
    score: Callable[[dict], float]
    uses_diversity: bool = False

    def __call__(self, row: dict) -> float:
        return self.score(row)


def _diversity_gap(row: dict) -> float:
    """|1 - diversity ratio|; inf where the ratio could not be measured (classes of fewer than 2 fields)."""
    ratio = row.get("diversity_ratio")
    return math.inf if ratio is None else abs(1.0 - ratio)


# The one list of objectives (validation.check_tune checks tune.objective against it); maximised scores are negated.
OBJECTIVES = {
    "nna_gap": Objective("|1-NNA - 0.5|", lambda row: abs(row["1nna"] - 0.5)),
    "mmd": Objective("MMD", lambda row: row["mmd"]),
    "cov": Objective("-COV", lambda row: -row["cov"]),
    "accuracy": Objective("-accuracy", lambda row: -row["accuracy"]),
    "diversity": Objective("|1 - within-class diversity ratio|", _diversity_gap, True),
    "balanced": Objective("|1-NNA - 0.5| + |1 - within-class diversity ratio|",
                          lambda row: abs(row["1nna"] - 0.5) + _diversity_gap(row), True),
}
