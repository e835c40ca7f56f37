"""Stage `fit`: batched field fitting, the split, shared/random init and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nefgpt import field, fields_io, fit, layout
from nefgpt.artifacts import load_tensors
from nefgpt.config import DataConfig, FitConfig, RunConfig
from nefgpt.errors import ArtifactError
from nefgpt.field import FieldSpec
from nefgpt.split import load_split_images
from nefgpt.stages import stage_fingerprint

SPEC = FieldSpec()


def blobs(n: int, res: int = 28, seed: int = 0) -> torch.Tensor:
    """n images with one soft blob each, at random places."""
    g = torch.Generator().manual_seed(seed)
    c = (torch.arange(res) + 0.5) / res
    y, x = torch.meshgrid(c, c, indexing="ij")
    centres = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    d2 = (x[None] - centres[:, 0, None, None]) ** 2 + (y[None] - centres[:, 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * 0.1**2))


def bce(weights: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    feats = field.encode(field.pixel_coords(images.shape[-1]), SPEC.octaves)
    logits = field.forward(SPEC, weights, feats)
    return F.binary_cross_entropy_with_logits(logits, images.flatten(1), reduction="none").mean(1)


def init(n: int, seed: int = 0) -> torch.Tensor:
    return field.init_random(SPEC, n, torch.Generator().manual_seed(seed))


def test_fit_batch_lowers_loss_and_raises_psnr():
    images = blobs(3)
    start = init(3)
    fitted = fit.fit_batch(SPEC, start, images, steps=60, lr=1e-2)
    assert fitted.shape == start.shape
    assert not fitted.requires_grad
    assert (bce(fitted, images) < bce(start, images) - 0.05).all()
    before = field.psnr(field.render(SPEC, start), images)
    after = field.psnr(field.render(SPEC, fitted), images)
    assert (after > before + 5).all()
    assert (after > 15).all()
    # The initial weights are not modified in place.
    assert torch.equal(start, init(3))


def test_fit_batch_with_zero_steps_returns_the_init():
    start = init(2)
    assert torch.equal(fit.fit_batch(SPEC, start, blobs(2), steps=0, lr=1e-2), start)


def test_init_l2_pulls_each_field_toward_its_init_and_zero_is_the_plain_fit():
    images = blobs(3, seed=2)
    start = init(3, seed=2)
    plain = fit.fit_batch(SPEC, start, images, steps=40, lr=1e-2)
    assert torch.equal(fit.fit_batch(SPEC, start, images, steps=40, lr=1e-2, init_l2=0.0), plain)
    pulled = fit.fit_batch(SPEC, start, images, steps=40, lr=1e-2, init_l2=1e-2)
    assert ((pulled - start).norm(dim=1) < 0.8 * (plain - start).norm(dim=1)).all()
    # The pull is a penalty on the loss, not a clamp: the fields still fit their images.
    assert (bce(pulled, images) < bce(start, images) - 0.05).all()


def test_batched_fit_equals_fitting_each_field_alone():
    images = blobs(4, seed=1)
    start = init(4, seed=1)
    together = fit.fit_batch(SPEC, start, images, steps=25, lr=1e-2)
    for i in range(4):
        alone = fit.fit_batch(SPEC, start[i : i + 1], images[i : i + 1], steps=25, lr=1e-2)
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=0)
    # Shared init (one row expanded to all) behaves the same way.
    shared = fit.fit_batch(SPEC, start[:1].expand(4, -1), images, steps=10, lr=1e-2)
    alone = fit.fit_batch(SPEC, start[:1], images[2:3], steps=10, lr=1e-2)
    torch.testing.assert_close(shared[2:3], alone, atol=1e-5, rtol=0)


def fit_cfg(**kw) -> FitConfig:
    base = dict(steps=8, anchor_steps=15, chunk_size=25, lr=1e-2, anchor_lr=3e-3)
    base.update(kw)
    return FitConfig(**base)


def data_cfg(npz: Path, **kw) -> DataConfig:
    return DataConfig(dataset=f"npz:{npz}", heldout_per_class=2, tune_per_class=kw.pop("tune_per_class", 1), **kw)


def test_run_fit_writes_fields_and_a_stratified_split(tiny_npz, tmp_path):
    run = tmp_path / "run"
    meta = fit.run_fit(data_cfg(tiny_npz), fit_cfg(), run, progress=False)
    tensors, stored = load_tensors(run / layout.NEFS_FILE)
    assert tensors["weights"].shape == (60, 561) and tensors["weights"].dtype == torch.float32
    assert tensors["psnr"].shape == (60,) and torch.isfinite(tensors["psnr"]).all()
    assert tensors["labels"].dtype == torch.int64
    assert stored["psnr_mean"] == pytest.approx(float(tensors["psnr"].mean()), rel=1e-5)
    assert stored["field"] == SPEC.to_meta() and stored["init"] == "shared"
    assert meta["psnr_mean"] == pytest.approx(stored["psnr_mean"])
    assert torch.equal(tensors["anchor"], load_tensors(run / layout.ANCHOR_FILE)[0]["weights"][0])
    assert not (run / layout.CHUNK_DIR).exists()  # chunks are cleaned up at the end

    split = json.loads((run / layout.SPLIT_FILE).read_text())
    assert split["dataset"] == f"npz:{tiny_npz}" and split["num_classes"] == 10 and split["image_size"] == 28
    assert split["indices"] == list(range(60))
    train, held, tune = split["train"], split["heldout"], split["tune"]
    assert sorted(train + held + tune) == list(range(60)) and len(set(train) | set(held) | set(tune)) == 60
    labels = tensors["labels"]
    assert torch.bincount(labels[held], minlength=10).tolist() == [2] * 10
    assert torch.bincount(labels[tune], minlength=10).tolist() == [1] * 10
    assert torch.bincount(labels[train], minlength=10).tolist() == [3] * 10
    # How far the fields moved from the shared anchor is recorded, with the per-position spread.
    assert stored["init_distance_mean"] > 0 and stored["position_std_mean"] > 0

    # Fields are in split order: labels match the dataset's, and the psnr is that of the stored weights.
    _, images, ds_labels = load_split_images(run)
    assert torch.equal(labels, ds_labels)
    torch.testing.assert_close(field.psnr(field.render(SPEC, tensors["weights"]), images), tensors["psnr"])

    nefs, nef_meta = fields_io.load_nefs(run, SPEC)
    assert nef_meta["spec"] == SPEC
    with pytest.raises(ArtifactError, match="nefs.safetensors"):
        fields_io.load_nefs(run, FieldSpec(octaves=3))


def test_subset_per_class_limits_the_fields(tiny_npz, tmp_path):
    run = tmp_path / "run"
    fit.run_fit(data_cfg(tiny_npz, subset_per_class=3, tune_per_class=0), fit_cfg(init="random", steps=1), run,
                progress=False)
    tensors, _ = load_tensors(run / layout.NEFS_FILE)
    assert torch.bincount(tensors["labels"], minlength=10).tolist() == [3] * 10
    assert len(json.loads((run / layout.SPLIT_FILE).read_text())["heldout"]) == 20


def test_shared_init_starts_every_field_at_the_anchor(tiny_npz, tmp_path):
    run = tmp_path / "shared"
    fit.run_fit(data_cfg(tiny_npz), fit_cfg(steps=0, anchor_steps=100, anchor_lr=1e-2), run, progress=False)
    tensors, _ = load_tensors(run / layout.NEFS_FILE)
    w = tensors["weights"]
    # With no per-field steps, every field is the anchor, which was fitted to the first training image.
    assert torch.equal(w, tensors["anchor"].expand_as(w))
    split = json.loads((run / layout.SPLIT_FILE).read_text())
    first = split["train"][0]
    assert tensors["psnr"][first] > tensors["psnr"].median() + 3
    _, anchor_meta = load_tensors(run / layout.ANCHOR_FILE)
    assert anchor_meta["image"] == first


def test_random_init_gives_distinct_fields_and_no_anchor(tiny_npz, tmp_path):
    run = tmp_path / "random"
    fit.run_fit(data_cfg(tiny_npz), fit_cfg(init="random", steps=0), run, progress=False)
    tensors, meta = load_tensors(run / layout.NEFS_FILE)
    assert meta["init"] == "random" and "anchor" not in tensors
    assert not (run / layout.ANCHOR_FILE).exists()
    w = tensors["weights"]
    assert len(torch.unique(w[:, 0])) == len(w)  # every field drew its own init

    run2 = tmp_path / "random_fitted"
    fit.run_fit(data_cfg(tiny_npz), fit_cfg(init="random", steps=30), run2, progress=False)
    fitted, _ = load_tensors(run2 / layout.NEFS_FILE)
    assert float(fitted["psnr"].mean()) > float(tensors["psnr"].mean()) + 3


def test_shared_init_fits_better_at_equal_steps(tiny_npz, tmp_path):
    shared, random = tmp_path / "s", tmp_path / "r"
    fit.run_fit(data_cfg(tiny_npz), fit_cfg(steps=20, anchor_steps=100, anchor_lr=1e-2), shared, progress=False)
    fit.run_fit(data_cfg(tiny_npz), fit_cfg(steps=20, init="random"), random, progress=False)
    ps = load_tensors(shared / layout.NEFS_FILE)[0]["psnr"]
    pr = load_tensors(random / layout.NEFS_FILE)[0]["psnr"]
    assert torch.isfinite(ps).all() and torch.isfinite(pr).all()
    # Weight conditioning: starting from a fitted anchor beats a random start at the same budget.
    assert float(ps.mean()) > float(pr.mean()) + 1


class Crash(Exception):
    pass


@pytest.mark.parametrize("init_kind", ["shared", "random"])
def test_resume_after_a_crash_gives_identical_bytes(tiny_npz, tmp_path, monkeypatch, init_kind):
    cfg = fit_cfg(init=init_kind, chunk_size=20)  # 60 fields: three chunks
    whole = tmp_path / "whole"
    fit.run_fit(data_cfg(tiny_npz), cfg, whole, progress=False)

    real_fit_batch = fit.fit_batch
    calls = []

    def crashing(*args, **kwargs):
        calls.append(args[2].shape[0])
        # shared: anchor, chunk 0, then crash on chunk 1; random: chunk 0, then crash on chunk 1.
        if len(calls) == (3 if init_kind == "shared" else 2):
            raise Crash
        return real_fit_batch(*args, **kwargs)

    part = tmp_path / "part"
    monkeypatch.setattr(fit, "fit_batch", crashing)
    with pytest.raises(Crash):
        fit.run_fit(data_cfg(tiny_npz), cfg, part, progress=False)
    assert not (part / layout.NEFS_FILE).exists()
    assert sorted(p.name for p in (part / layout.CHUNK_DIR).iterdir()) == ["chunk_0000000.safetensors"]

    calls.clear()

    def counting(*args, **kwargs):
        calls.append(args[2].shape[0])
        return real_fit_batch(*args, **kwargs)

    monkeypatch.setattr(fit, "fit_batch", counting)
    fit.run_fit(data_cfg(tiny_npz), cfg, part, progress=False)
    assert calls == [20, 20]  # neither the anchor nor the finished chunk is fitted again

    a, _ = load_tensors(whole / layout.NEFS_FILE)
    b, _ = load_tensors(part / layout.NEFS_FILE)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k


def test_fit_resumes_from_a_kept_chunk_file(tiny_npz, tmp_path):
    """A chunk left in fit_chunks by an earlier run is used as is rather than refitted."""
    cfg = fit_cfg(init="random", chunk_size=30)
    first = tmp_path / "first"
    fit.run_fit(data_cfg(tiny_npz), cfg, first, progress=False)
    weights = load_tensors(first / layout.NEFS_FILE)[0]["weights"]

    second = tmp_path / "second"
    second.mkdir()
    shutil.copy(first / layout.SPLIT_FILE, second / layout.SPLIT_FILE)
    marker = torch.full((30, 561), 0.25)  # not what fitting would give, so we can tell it was reused
    from nefgpt.artifacts import save_tensors

    save_tensors(second / layout.CHUNK_DIR / "chunk_0000000.safetensors", {"weights": marker}, {"field": SPEC.to_meta()})
    fit.run_fit(data_cfg(tiny_npz), cfg, second, progress=False)
    got = load_tensors(second / layout.NEFS_FILE)[0]["weights"]
    assert torch.equal(got[:30], marker)
    assert torch.equal(got[30:], weights[30:])


def test_a_run_made_before_init_l2_existed_stays_fresh():
    # The fit fingerprint that a run with the default settings recorded in stages.json before fit.init_l2
    # existed: at 0 the new setting is left out, so such a run directory is not refitted.
    before = "3c1b132f2cf8c549"
    assert stage_fingerprint(RunConfig(), "fit") == before
    pulled = RunConfig()
    pulled.fit.init_l2 = 1e-3
    assert stage_fingerprint(pulled, "fit") != before
    augmented = RunConfig()
    augmented.fit.augment_shifts = 2
    assert stage_fingerprint(augmented, "fit") != before


def test_shift_images_moves_by_one_pixel_and_fills_zeros():
    image = torch.zeros(5, 5)
    image[0, 0], image[2, 3] = 1.0, 0.5
    for dy, dx in fit.SHIFTS:
        moved = fit.shift_images(image, dy, dx)
        assert moved.shape == image.shape
        assert moved[2 + dy, 3 + dx] == 0.5
        # The corner pixel moves in, or leaves the image: nothing wraps around to the far side.
        assert moved.sum() == 0.5 + (1.0 if dy >= 0 and dx >= 0 else 0.0)
    assert torch.equal(fit.shift_images(image[None], 1, 0)[0], fit.shift_images(image, 1, 0))


def test_augmented_images_are_distinct_seeded_moves_of_each_image():
    images = blobs(3)
    moved, source, moves = fit.augmented_images(images, 4, seed=0)
    assert moved.shape == (12, 28, 28) and source.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for i in range(3):
        assert len({tuple(m) for m in moves[source == i].tolist()}) == 4  # no move twice for one image
    for k in range(12):
        assert torch.equal(moved[k], fit.shift_images(images[source[k]], *moves[k].tolist()))
    again = fit.augmented_images(images, 4, seed=0)
    assert all(torch.equal(a, b) for a, b in zip((moved, source, moves), again))
    assert not torch.equal(fit.augmented_images(images, 4, seed=1)[2], moves)
    empty = fit.augmented_images(images, 0, seed=0)
    assert [t.shape[0] for t in empty] == [0, 0, 0]


def test_augment_shifts_appends_fitted_shifted_training_fields(tiny_npz, tmp_path):
    plain, augmented = tmp_path / "plain", tmp_path / "aug"
    fit.run_fit(data_cfg(tiny_npz), fit_cfg(steps=60, lr=3e-2), plain, progress=False)
    meta = fit.run_fit(data_cfg(tiny_npz), fit_cfg(steps=60, lr=3e-2, augment_shifts=2), augmented, progress=False)
    a, _ = load_tensors(plain / layout.NEFS_FILE)
    b, stored = load_tensors(augmented / layout.NEFS_FILE)
    split = json.loads((augmented / layout.SPLIT_FILE).read_text())
    train = split["train"]
    # The split's fields come first, exactly as without augmentation; the moved copies follow.
    assert b["weights"].shape == (60 + 2 * len(train), 561)
    assert torch.equal(b["weights"][:60], a["weights"]) and torch.equal(b["labels"][:60], a["labels"])
    assert stored["augment"] == {**meta["augment"], "first_row": 60, "rows": 2 * len(train), "shifts_per_image": 2}
    assert meta["psnr_mean"] == pytest.approx(float(a["psnr"].mean()))  # the split's fields only
    source = b["augment_source"]
    assert source.tolist() == [r for r in train for _ in range(2)]
    assert torch.equal(b["labels"][60:], b["labels"][source])
    # Each copy is fitted to its moved image: it matches that image better than the unmoved one.
    _, images, _ = load_split_images(augmented)
    moved = torch.stack([fit.shift_images(images[r], *m.tolist()) for r, m in zip(source, b["augment_shift"])])
    rendered = field.render(SPEC, b["weights"][60:])
    assert torch.allclose(field.psnr(rendered, moved), b["psnr"][60:], atol=1e-3)
    assert float(field.psnr(rendered, moved).mean()) > float(field.psnr(rendered, images[source]).mean())

    loaded, loaded_meta = fields_io.load_nefs(augmented)
    rows = fields_io.training_rows(split, loaded_meta)
    assert rows.tolist() == train + list(range(60, 60 + 2 * len(train)))
    assert fields_io.training_rows(split, fields_io.load_nefs(plain)[1]).tolist() == train


def test_nefs_with_a_wrong_augment_record_is_refused(tiny_npz, tmp_path):
    from nefgpt.artifacts import save_tensors

    run = tmp_path / "aug"
    fit.run_fit(data_cfg(tiny_npz), fit_cfg(augment_shifts=1), run, progress=False)
    tensors, meta = load_tensors(run / layout.NEFS_FILE)
    meta["augment"]["rows"] += 1
    save_tensors(run / layout.NEFS_FILE, tensors, meta)
    with pytest.raises(ArtifactError, match="nefs.safetensors: metadata 'augment'"):
        fields_io.load_nefs(run)
