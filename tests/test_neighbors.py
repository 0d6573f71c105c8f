"""The exact cosine search: top-k and threshold pairs against brute force, ties, blocks, rows in place, torch."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import normalize

from pipeline.heads import neighbors
from pipeline.heads.neighbors import Centred, pairs_at_least, top_k

# Blocks far smaller than the data, so that queries and references span several blocks (and a block holds fewer
# reference rows than k): the merge across blocks is what these check.
SMALL = [None, (7, 5), (64, 3)]


def random_rows(n: int, dim: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def dense_order(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The brute-force answer: the whole cosine matrix (float32 products of normalised rows, as the search takes
    them), each row sorted by cosine, then by reference position."""
    cosines = normalize(queries) @ normalize(reference).T
    positions = np.broadcast_to(np.arange(cosines.shape[1]), cosines.shape)
    order = np.lexsort((positions, -cosines), axis=1)
    return np.take_along_axis(cosines, order, axis=1), order


@pytest.mark.parametrize("blocks", SMALL)
def test_top_k_finds_scikit_learns_cosine_neighbours(blocks):
    reference, queries = random_rows(300), random_rows(50, seed=1)
    cosines, positions = top_k(queries, reference, 10, blocks=blocks)
    distances, expected = (
        NearestNeighbors(n_neighbors=10, metric="cosine", algorithm="brute").fit(reference).kneighbors(queries)
    )
    np.testing.assert_array_equal(positions, expected)
    np.testing.assert_allclose(cosines, 1 - distances, atol=1e-6)
    assert cosines.dtype == np.float32 and positions.dtype == np.int64


def tied_rows(n: int, seed: int = 0) -> np.ndarray:
    """Rows of four +-1 and four 0 in 8 dimensions: norm 2, so normalised entries are +-0.5 and every cosine is a
    multiple of 1/4, computed exactly whatever the order of the sums. Most cosines tie, as computed: BLAS rounds a
    cosine of other rows differently depending on where the row falls in its tiles, so copies of a random row need
    not tie."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((n, 8), dtype=np.float32)
    for row in rows:
        row[rng.permutation(8)[:4]] = rng.choice([-1.0, 1.0], size=4)
    return rows


@pytest.mark.parametrize(("device", "bf16"), [(None, False), ("cpu", False), (None, True)])
@pytest.mark.parametrize("blocks", SMALL)
def test_ties_go_to_the_lower_reference_position_whatever_the_blocks(blocks, device, bf16):
    if device is not None or bf16:
        pytest.importorskip("torch")
    reference = tied_rows(60)
    queries = np.vstack([tied_rows(20, seed=1), np.zeros((2, 8), np.float32)])
    expected_cosines, expected_positions = dense_order(queries, reference)
    for k in (1, 2, 7, 60):
        cosines, positions = top_k(queries, reference, k, blocks=blocks, device=device, bf16=bf16)
        np.testing.assert_array_equal(positions, expected_positions[:, :k])
        np.testing.assert_array_equal(cosines, expected_cosines[:, :k])
    # An all-zero query has cosine 0 to every row: all tie, and the first k rows are its neighbours.
    first = top_k(queries[-1:], reference, 5, blocks=blocks, device=device, bf16=bf16)[1]
    np.testing.assert_array_equal(first, [[0, 1, 2, 3, 4]])


def test_rows_are_searched_where_they_lie_in_a_larger_array():
    features = random_rows(200)
    query_rows, reference_rows = np.arange(1, 200, 3), np.flatnonzero(np.arange(200) % 3 == 0)
    got = top_k(features, features, 6, query_rows=query_rows, reference_rows=reference_rows, blocks=(8, 16))
    expected = top_k(features[query_rows], features[reference_rows], 6)
    np.testing.assert_array_equal(got[1], expected[1])  # positions count the searched rows, not the array's
    np.testing.assert_allclose(got[0], expected[0], atol=1e-6)  # other blocks: a product rounded otherwise


def test_k_must_be_between_one_and_the_reference_rows():
    with pytest.raises(ValueError, match="k must be between 1 and the 5 reference rows; got 6"):
        top_k(random_rows(3), random_rows(5), 6)
    with pytest.raises(ValueError, match="got 0"):
        top_k(random_rows(3), random_rows(5), 0)


@pytest.mark.parametrize("blocks", SMALL)
@pytest.mark.parametrize("threshold", [0.95, 0.5, -1.0])
def test_pairs_at_least_a_threshold_are_those_of_the_dense_matrix(blocks, threshold):
    reference, queries = random_rows(120, dim=6), random_rows(40, dim=6, seed=1)
    queries[:8] = reference[:8] * 2 + 0.01  # near-copies above any threshold
    cosines = normalize(queries) @ normalize(reference).T
    i, j, got = pairs_at_least(queries, reference, threshold, blocks=blocks)
    expected_i, expected_j = np.nonzero(cosines >= threshold)  # in query, then reference order
    np.testing.assert_array_equal(i, expected_i)
    np.testing.assert_array_equal(j, expected_j)
    np.testing.assert_allclose(got, cosines[expected_i, expected_j], atol=1e-6)
    assert got.min(initial=1.0) >= threshold


def test_no_pairs_and_no_rows_give_empty_answers():
    i, j, cosines = pairs_at_least(random_rows(5), random_rows(7), 1.5)
    assert (i.shape, j.shape, cosines.shape) == ((0,), (0,), (0,))
    cosines, positions = top_k(np.empty((0, 12), np.float32), random_rows(7), 3)
    assert cosines.shape == positions.shape == (0, 3)


@pytest.mark.parametrize("blocks", [None, (7, 5)])
def test_the_torch_search_on_the_cpu_gives_the_numpy_answer(blocks):
    """The code that runs on a GPU, run on torch's CPU device: the same neighbours and pairs; the cosines agree to
    float32 rounding (another library's matrix product and norms). Ties: above."""
    pytest.importorskip("torch")
    reference, queries = random_rows(150), random_rows(30, seed=1)
    queries[:4] = reference[:4] + 0.001  # near-copies
    for k in (1, 9):
        expected = top_k(queries, reference, k, blocks=blocks)
        got = top_k(queries, reference, k, blocks=blocks, device="cpu")
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
    rows = np.arange(0, 150, 2)
    got = pairs_at_least(queries, reference, 0.3, reference_rows=rows, blocks=blocks, device="cpu")
    expected = pairs_at_least(queries, reference, 0.3, reference_rows=rows, blocks=blocks)
    for a, b in zip(got[:2], expected[:2], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(got[2], expected[2], atol=1e-6)


def clustered_rows(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Non-negative rows around 5 shared directions (as CNN embeddings are), so that many cosines lie within the
    bfloat16 pass's error of each other: the candidates it keeps decide the answer."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(2.0, 1.0, size=(5, dim))
    rows = centres[rng.integers(0, 5, n)] + rng.normal(scale=0.6, size=(n, dim))
    return np.maximum(rows, 0.0).astype(np.float32)


def assert_as_near(got: tuple, expected: tuple, queries: np.ndarray, reference: np.ndarray) -> None:
    """The same neighbours but where two cosines are equal to float32 rounding (the float32 pass computes a pair's
    cosine by another sum than the matrix product: 1e-7 apart, they can rank either way): the same cosines in the
    same order, and neighbours whose float64 cosines are those of the expected ones."""
    np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
    exact = normalize(queries.astype(np.float64)) @ normalize(reference.astype(np.float64)).T
    rows = np.arange(len(queries))[:, None]
    np.testing.assert_allclose(exact[rows, got[1]], exact[rows, expected[1]], atol=1e-6)
    assert np.mean(got[1] == expected[1]) > 0.99


@pytest.mark.parametrize("width", [(2, 64), (1, 0)])  # neighbors_bf16.BF16_WIDTH, and k alone
@pytest.mark.parametrize("blocks", [None, (7, 5), (64, 33)])
def test_the_bf16_candidate_pass_gives_the_float32_answer(blocks, width, monkeypatch):
    """bf16: rough cosines by a bfloat16 product, then float32 for the pairs its error bound cannot rule out: the
    same neighbours and pairs as the float32 search, cosines to float32 rounding. Width (1, 0) keeps k rough
    neighbours alone, so that most queries cannot be shown complete and are searched again in float32."""
    bf16_pass = pytest.importorskip("pipeline.heads.neighbors_bf16")  # needs torch
    assert bf16_pass.BF16_WIDTH == (2, 64)
    monkeypatch.setattr(bf16_pass, "BF16_WIDTH", width)
    reference, queries = clustered_rows(600), clustered_rows(90, seed=1)
    queries[:6] = reference[:6] * 1.5 + 0.001  # near-copies: cosines near 1, rounded to bfloat16 at 1
    queries[6] = 0.0  # cosine 0 to everything
    for k in (1, 3, 25):
        expected = top_k(queries, reference, k, blocks=blocks, bf16=False)
        got = top_k(queries, reference, k, blocks=blocks, bf16=True)
        assert_as_near(got, expected, queries, reference)
    rows = np.arange(1, 600, 2)
    for threshold in (0.999, 0.9, -1.0):
        expected = pairs_at_least(queries, reference, threshold, reference_rows=rows, blocks=blocks, bf16=False)
        got = pairs_at_least(queries, reference, threshold, reference_rows=rows, blocks=blocks, bf16=True)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_allclose(got[2], expected[2], atol=1e-6)


@pytest.mark.parametrize("bf16", [False, True])
def test_centred_rows_are_searched_as_a_centred_copy_would_be(bf16):
    """Centred (CL2N's centring) reads the rows where they lie, minus the centre, on both sides of the search."""
    if bf16:
        pytest.importorskip("torch")
    features = clustered_rows(300)
    centre = features.mean(axis=0)
    rows = np.arange(0, 300, 3)
    got = top_k(Centred(features, centre), Centred(features, centre), 5, query_rows=rows[:40], reference_rows=rows,
                blocks=(16, 32), bf16=bf16)  # fmt: skip
    centred = features - centre
    expected = top_k(centred[rows[:40]], centred[rows], 5, bf16=False)
    assert_as_near(got, expected, centred[rows[:40]], centred[rows])
    pairs = pairs_at_least(Centred(features, centre), Centred(features, centre), 0.5, blocks=(16, 32), bf16=bf16)
    expected_pairs = pairs_at_least(centred, centred, 0.5, bf16=False)
    np.testing.assert_array_equal(pairs[0], expected_pairs[0])
    np.testing.assert_array_equal(pairs[1], expected_pairs[1])
    assert features.mean(axis=0) == pytest.approx(centre)  # the rows themselves are left as they are


def test_the_bf16_error_bound_holds():
    """Bf16Error.bound: the bfloat16 product of normalised rows is within it of the cosine (float64 here), on rows
    of mixed signs and magnitudes; and it is not loose by an order of magnitude (the candidates it keeps)."""
    torch = pytest.importorskip("torch")
    from pipeline.heads.neighbors_bf16 import Bf16Error

    rng = np.random.default_rng(3)
    rows = normalize((rng.normal(size=(400, 256)) * rng.gamma(0.5, 1.0, size=256)).astype(np.float32))
    low = torch.from_numpy(rows).to(torch.bfloat16)
    error = torch.linalg.vector_norm(torch.from_numpy(rows) - low.float(), dim=1).numpy().astype(np.float64)
    rough = (low[:100] @ low.T).float().numpy().astype(np.float64)
    cosines = rows[:100].astype(np.float64) @ rows.T.astype(np.float64)
    rounding = np.where(np.abs(rough) < 1, 2.0**-9, 2.0**-8)
    bound = Bf16Error(error[:100], float(error.max()), 256).bound(0.0)[:, None] + rounding
    assert np.all(np.abs(rough - cosines) <= bound)
    assert np.abs(rough - cosines).max() > bound.min() / 10


def test_the_bf16_pass_runs_where_it_pays(monkeypatch):
    monkeypatch.setattr(neighbors, "cpu_multiplies_bf16", lambda: True)
    assert not neighbors.bf16_candidates(15_000, 5_000, 1280)  # 9.6e10 multiply-adds: float32 alone
    assert neighbors.bf16_candidates(15_000, 70_000, 1280)
    monkeypatch.setattr(neighbors, "cpu_multiplies_bf16", lambda: False)
    assert not neighbors.bf16_candidates(15_000, 70_000, 1280)  # torch would emulate bfloat16: slower


@pytest.mark.gpu
@pytest.mark.parametrize("cache_share", [neighbors.CUDA_CACHE_SHARE, 0.0])
@pytest.mark.parametrize("blocks", [None, (128, 256)])
def test_the_cuda_search_gives_the_numpy_answer(blocks, cache_share, monkeypatch):
    """On a CUDA GPU (pytest -m gpu): the same neighbours and pairs as numpy, cosines to float32 rounding, exact ties
    as the dense order, with the reference blocks kept on the GPU between query blocks and copied again each time.
    The default tier has no GPU to run this."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.setattr(neighbors, "CUDA_CACHE_SHARE", cache_share)
    reference, queries = random_rows(3000, dim=64), random_rows(500, dim=64, seed=1)
    queries[:10] = reference[:10] + 0.001
    expected, got = (
        top_k(queries, reference, 20, blocks=blocks),
        top_k(queries, reference, 20, blocks=blocks, device="cuda"),
    )
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
    tied, tied_queries = tied_rows(300), tied_rows(40, seed=1)
    cosines, positions = top_k(tied_queries, tied, 30, blocks=blocks, device="cuda")
    expected_cosines, expected_positions = dense_order(tied_queries, tied)
    np.testing.assert_array_equal(positions, expected_positions[:, :30])
    np.testing.assert_array_equal(cosines, expected_cosines[:, :30])
    got, expected = (pairs_at_least(queries, reference, 0.3, blocks=blocks, device=d) for d in ("cuda", None))
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[2], expected[2], atol=1e-6)
    assert torch.get_float32_matmul_precision() == "highest"  # put back as it was (the default)
