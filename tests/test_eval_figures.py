"""The figures `evaluate` writes: nearest training fields, confusion matrix, generation GIF."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nefgpt import field
from nefgpt.eval_figures import (
    first_per_class,
    generation_frames,
    nearest_figure,
    save_generation_gif,
    write_eval_figures,
)
from nefgpt.figures import save_confusion_matrix
from nefgpt.layout import CONFUSION_FILE, GENERATION_FILE, NEAREST_FILE

SPEC = field.FieldSpec()


def fields(n: int, seed: int) -> torch.Tensor:
    return field.init_random(SPEC, n, torch.Generator().manual_seed(seed)) * 3


def test_first_per_class_keeps_class_order_and_caps_each_class():
    labels = torch.tensor([2, 0, 2, 2, 1, 0])
    assert first_per_class(labels, 2) == [1, 5, 4, 0, 2]
    assert first_per_class(labels, 1) == [1, 4, 0]


def test_generation_frames_morph_from_the_start_into_the_fields():
    weights, start = fields(3, 0), fields(1, 1)[0]
    frames, counts = generation_frames(SPEC, weights, start, steps=40, res=16)
    assert counts[0] == 0 and counts[-1] == SPEC.num_params and counts == sorted(set(counts))
    assert 30 <= len(frames) == len(counts) <= 41
    torch.testing.assert_close(frames[0], field.render(SPEC, start.expand(3, -1), 16))
    torch.testing.assert_close(frames[-1], field.render(SPEC, weights, 16))
    # Halfway, the first layer is the sample's and the output layer still the start's.
    half = counts.index(min(counts, key=lambda m: abs(m - SPEC.num_params // 2)))
    partial = start.expand(3, -1).clone()
    partial[:, : counts[half]] = weights[:, : counts[half]]
    torch.testing.assert_close(frames[half], field.render(SPEC, partial, 16))


def test_generation_frames_follow_the_sequence_order():
    from nefgpt.codebook import sequence_order

    weights, start = fields(2, 0), fields(1, 1)[0]
    order = sequence_order(SPEC, "output_first")
    frames, counts = generation_frames(SPEC, weights, start, steps=10, res=16, order=order)
    m = counts[len(counts) // 2]
    partial = start.expand(2, -1).clone()
    partial[:, order[:m]] = weights[:, order[:m]]  # the output layers first: the first layer is still the start's
    torch.testing.assert_close(frames[len(counts) // 2], field.render(SPEC, partial, 16))
    torch.testing.assert_close(frames[-1], field.render(SPEC, weights, 16))


def test_generation_gif_has_every_frame_and_holds_the_result(tmp_path):
    start = torch.zeros(SPEC.num_params)
    n_frames = save_generation_gif(tmp_path / "g.gif", SPEC, fields(4, 0), torch.arange(4), start, steps=30, res=32)
    with Image.open(tmp_path / "g.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == n_frames == 31
        assert gif.width > 4 * 32 and gif.height > 32
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
        last = np.asarray(gif.convert("L"))  # the finished fields
    assert durations[-1] > durations[1] and durations[0] > durations[1]
    assert last.std() > 0


def test_nearest_figure_shows_each_sample_beside_its_neighbours():
    gen = torch.Generator().manual_seed(0)
    pool = torch.rand(6, 28, 28, generator=gen)
    samples = pool[[4, 1]].clone()
    labels = torch.tensor([0, 1])
    neighbours = torch.tensor([[4, 0, 2], [1, 3, 5]])
    distances = torch.tensor([[0.0, 0.3, 0.4], [0.0, 0.2, 0.25]])
    img = np.asarray(nearest_figure(samples, labels, pool, distances, neighbours, per_row=2, scale=3).convert("L"))
    expected = (pool[4].numpy() * 255).round().astype(np.uint8)
    # Find the first neighbour's tile by its top-left pixels: it must be the whole 3x upscaled pool image 4.
    tile = np.kron(expected, np.ones((3, 3), np.uint8))
    hits = [(y, x) for y in range(img.shape[0] - 84) for x in range(img.shape[1] - 84)
            if img[y, x] == tile[0, 0] and np.array_equal(img[y:y + 84, x:x + 84], tile)]
    assert len(hits) == 2  # the sample itself and its nearest neighbour, side by side in one row
    assert hits[0][0] == hits[1][0] and hits[1][1] > hits[0][1]


def test_confusion_matrix_png(tmp_path):
    confusion = np.diag([5] * 10).tolist()
    confusion[3][5], confusion[7] = 2, [0] * 10  # class 7 never sampled: an empty row must not break the shares
    save_confusion_matrix(tmp_path / "c.png", confusion, "test")
    with Image.open(tmp_path / "c.png") as img:
        assert img.format == "PNG" and min(img.size) > 200


@pytest.mark.parametrize("autoregressive", [True, False])
def test_write_eval_figures(tmp_path, autoregressive):
    weights = fields(6, 0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    images = field.render(SPEC, weights, 28)
    train = torch.cat([images[[3, 0]], field.render(SPEC, fields(5, 2), 28)])
    (tmp_path / GENERATION_FILE).write_bytes(b"stale")
    written = write_eval_figures(tmp_path, SPEC, images, weights, labels, train, np.eye(10, dtype=int).tolist(),
                                 None, autoregressive)
    assert written[:2] == [NEAREST_FILE, CONFUSION_FILE]
    assert (GENERATION_FILE in written) == autoregressive == (tmp_path / GENERATION_FILE).exists()
    with Image.open(tmp_path / NEAREST_FILE) as img:
        assert img.height > 3 * 84  # one row per class
    if autoregressive:
        with Image.open(tmp_path / GENERATION_FILE) as gif:
            frame = np.asarray(gif.convert("L"))  # frame 0: every weight still 0, so sigmoid(0) = 0.5 everywhere
        assert frame[16 + 10, 4 + 10] in (127, 128)


@pytest.mark.parametrize("offsets, order, expected", [
    ("none", "input_first", (True, "input_first")), ("none", "output_first", (True, "output_first")),
    ("pca", "input_first", (False, None))])
def test_generation_order_follows_the_runs_tokenizer(tmp_path, offsets, order, expected):
    from nefgpt.codebook import save_tokenizer, sequence_order
    from nefgpt.config import TokenizerConfig
    from nefgpt.evaluate import generation_order
    from nefgpt.layout import TOKENIZER_FILE
    from nefgpt.tokenizer import learn_tokenizer

    assert generation_order(tmp_path, SPEC, has_tokens=False) == (False, None)  # a baseline's samples
    assert generation_order(tmp_path, SPEC, has_tokens=True) == (True, None)  # no tokenizer: the flatten order
    cfg = TokenizerConfig(num_codes=16, max_iters=3, offsets=offsets, order=order)
    tok, _ = learn_tokenizer(fields(40, 0), SPEC, cfg, num_classes=3)
    save_tokenizer(tmp_path / TOKENIZER_FILE, tok)
    autoregressive, got = generation_order(tmp_path, SPEC, has_tokens=True)
    assert autoregressive == expected[0]
    if expected[1] is None:
        assert got is None
    else:
        assert torch.equal(got, sequence_order(SPEC, expected[1]))
