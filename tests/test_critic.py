"""The critic: it tells real fields from drawn ones, keeps candidates by its density ratio, and round-trips."""

from __future__ import annotations

import pytest
import torch

from nefgpt.critic import Critic, load_critic, save_critic, train_critic
from nefgpt.errors import ArtifactError

VALUES = torch.linspace(-1, 1, 33)  # a toy codebook: 33 ordered code values
P = 12  # weights per field


def _codes(n: int, centre: int, spread: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (centre + torch.randint(-spread, spread + 1, (n, P), generator=g)).clamp(0, len(VALUES) - 1)


@pytest.fixture(scope="module")
def critic() -> Critic:
    # Real fields of class c sit at code 10 + 8c; the "generator" draws them 4 codes too high.
    real = torch.cat([_codes(150, 10 + 8 * c, 3, c) for c in range(2)])
    fake = torch.cat([_codes(100, 14 + 8 * c, 3, 10 + c) for c in range(2)])
    labels_r = torch.arange(2).repeat_interleave(150)
    labels_f = torch.arange(2).repeat_interleave(100)
    return train_critic(VALUES[real], labels_r, VALUES[fake], labels_f, num_classes=2, quantile=0.5,
                        decode=lambda tokens: VALUES[tokens], seed=0)


def test_the_critic_ranks_real_fields_above_drawn_ones(critic):
    real = _codes(50, 10, 3, 99)
    fake = _codes(50, 14, 3, 98)
    labels = torch.zeros(50, dtype=torch.long)
    assert critic.logits(VALUES[real], labels).mean() > critic.logits(VALUES[fake], labels).mean() + 1.0
    assert critic.info["held_accuracy"] > 0.8 and 1 <= critic.info["best_epoch"] <= 30
    assert critic.info["n_real"] == 300 and critic.info["n_drawn"] == 200 and critic.info["quantile"] == 0.5


def test_the_threshold_is_the_quantile_of_the_drawn_fields_logits(critic):
    fake = torch.cat([_codes(100, 14 + 8 * c, 3, 10 + c) for c in range(2)])  # the critic's own drawn fields
    labels = torch.arange(2).repeat_interleave(100)
    above = critic.logits(VALUES[fake], labels) >= critic.thresholds[labels]
    for c in range(2):
        assert 0.45 <= float(above[labels == c].float().mean()) <= 0.55


def test_draw_accepted_fills_every_slot_in_order_with_kept_candidates(critic):
    calls = []

    def draw(labels: torch.Tensor) -> torch.Tensor:
        calls.append(len(labels))
        # candidates spread over both sides of the real fields, so some are rejected
        g = torch.Generator().manual_seed(len(calls))
        return torch.stack([_codes(1, 12 + 8 * int(c), 6, int(torch.randint(0, 10**6, (1,), generator=g)))[0]
                            for c in labels])

    labels = torch.tensor([1, 0, 0, 1, 1, 0, 0, 1] * 3)
    tokens, kept = critic.draw_accepted(draw, labels, torch.Generator().manual_seed(0))
    assert tokens.shape == (len(labels), P) and 0 < kept < 1 and critic.kept_fraction == kept
    assert sum(calls) > len(labels)  # it drew more candidates than slots
    # each slot holds a field of its class: class 1's codes lie 8 above class 0's
    centre = tokens.float().mean(1)
    assert (centre[labels == 1].min() > centre[labels == 0].max())
    again, _ = critic.draw_accepted(lambda labs: (calls.clear(), draw(labs))[1], labels,
                                    torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)  # the same generator state gives the same fields


def test_a_saved_critic_gives_the_same_logits(critic, tmp_path):
    path = tmp_path / "critic.safetensors"
    save_critic(path, critic)
    back = load_critic(path, critic.decode)
    codes, labels = _codes(20, 12, 5, 7), torch.ones(20, dtype=torch.long)
    assert torch.allclose(back.logits(VALUES[codes], labels), critic.logits(VALUES[codes], labels))
    assert torch.equal(back.thresholds, critic.thresholds) and back.info == critic.info


def test_a_file_that_is_not_a_critic_is_refused(tmp_path):
    from nefgpt.artifacts import save_tensors

    path = tmp_path / "critic.safetensors"
    save_tensors(path, {"mean": torch.zeros(3)})
    with pytest.raises(ArtifactError, match="critic.safetensors"):
        load_critic(path, lambda tokens: tokens.float())
