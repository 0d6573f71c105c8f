"""The bfloat16 candidate pass of pipeline.heads.neighbors' exact cosine search, on CPUs that multiply bfloat16
natively (pipeline.core.accelerator.cpu_multiplies_bf16), where a bfloat16 matrix product runs about 4x faster than a
float32 one: rows rounded to bfloat16 rank every pair roughly, a proven bound on that product's error (`Bf16Error`)
says which pairs could belong to the answer, and only those are computed in float32. Imported by neighbors only
where the pass runs (it imports torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.preprocessing import normalize

from pipeline.heads.neighbors import (  # the blocked search's pieces, which the pass shares
    _NO_KEY,
    _count,
    _decode,
    _keys,
    _NumpySearch,
    _reference_blocks,
    _rows,
)

# Rough neighbours the bfloat16 pass of top_k keeps per query: BF16_WIDTH[0] x k + BF16_WIDTH[1]. A query whose
# answer they cannot be shown to hold (its `width`-th rough cosine within the error bound of its k-th) is searched
# again in float32; at 10^5 synthetic rows none are, at k = 50.
BF16_WIDTH = (2, 64)
# Candidate pairs computed in float32 at a time (two float32 rows each: 2 x 1,280 x 4 bytes).
RERANK_PAIRS = 8192


def top_k_bf16(
    queries: np.ndarray,
    reference: np.ndarray,
    k: int,
    query_rows: np.ndarray | None,
    reference_rows: np.ndarray | None,
    blocks: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """top_k in two passes, the float32 answer (to float32 rounding: module docstring). Rough: each query's `width`
    best pairs by the bfloat16 product. Then the pairs whose float32 cosine could reach the k-th best's
    (`Bf16Error.floor`) are computed in float32 and ranked as the float32 search ranks them. A query whose width-th
    rough cosine is not below that floor (pairs beyond the width could belong to its answer) is returned among the
    unsure ones (positions among the queries), for neighbors.top_k to search again in float32: (cosines, positions,
    unsure)."""
    n_queries, n_reference = _count(queries, query_rows), _count(reference, reference_rows)
    width = min(n_reference, BF16_WIDTH[0] * k + BF16_WIDTH[1])
    query_block, reference_block = blocks
    search = Bf16Search()
    cosines, positions = np.empty((n_queries, k), dtype=np.float32), np.empty((n_queries, k), dtype=np.int64)
    again: list[np.ndarray] = []
    for start in range(0, n_queries, query_block):
        stop = min(start + query_block, n_queries)
        q = search.unit(_rows(queries, query_rows, start, stop))
        rough, found = _decode(
            search.top_keys(q, _reference_blocks(search, reference, reference_rows, reference_block), width)
        )
        error = search.error(q, reference.shape[1])
        floor = error.floor(rough[:, k - 1])
        i, j = np.nonzero(error.candidates(rough, floor))
        keys = np.full(found.shape, _NO_KEY, dtype=np.int64)
        keys[i, j] = _keys(float32_cosines(q.unit, i, found[i, j], search), found[i, j])
        top = np.partition(keys, width - k, axis=1)[:, width - k :]
        cosines[start:stop], positions[start:stop] = _decode(np.sort(top, axis=1)[:, ::-1])
        if width < n_reference:
            again.append(start + np.flatnonzero(~error.excludes(rough[:, -1], floor)))
    return cosines, positions, np.concatenate(again) if again else np.empty(0, dtype=np.int64)


def float32_cosines(q: np.ndarray, i: np.ndarray, positions: np.ndarray, search: Bf16Search) -> np.ndarray:
    """The float32 cosines of pairs (row i of the normalised query block q, searched reference row at `positions`),
    RERANK_PAIRS at a time: each reference row's product with its query row over its norm (the search's)."""
    reference, rows = search.source
    out = np.empty(len(i), dtype=np.float32)
    for start in range(0, len(i), RERANK_PAIRS):
        at = positions[start : start + RERANK_PAIRS]
        r = np.asarray(reference[at if rows is None else rows[at]], dtype=np.float32)
        out[start : start + RERANK_PAIRS] = np.einsum("ij,ij->i", q[i[start : start + RERANK_PAIRS]], r)
        out[start : start + RERANK_PAIRS] /= search.norms[at]
    return out


@dataclass(frozen=True)
class Bf16Error:
    """How far the bfloat16 product of two normalised rows q, r (of `n_features`) can be from their float32 cosine,
    for the query rows of a block. With q = q' + dq (q' rounded to bfloat16), q.r - q'.r' = q'.dr + dq.r' + dq.dr,
    at most (1 + u)(|dq| + |dr|) + |dq| |dr| by Cauchy-Schwarz (|q'| <= 1 + u, u = 2^-8, bfloat16's unit
    roundoff): `query` holds |dq| for each query row, `reference` the largest |dr| of the reference rows. Products
    of bfloat16 numbers are exact in float32, so the product's float32 sums are off by at most n u32, and the
    float32 cosine's own sums by as much (u32 = 2^-24). The result is rounded to bfloat16 (to nearest, checked):
    by at most 2^-9 below 1 in magnitude (where the rough value is below 1, so is the product), 2^-8 up to 2."""

    query: np.ndarray  # [n]
    reference: float
    n_features: int

    def bound(self, rounding: float) -> np.ndarray:
        u, u32 = 2.0**-8, 2.0**-24
        inputs = (1 + u) * (self.query + self.reference) + self.query * self.reference
        return inputs + 2.2 * self.n_features * u32 + rounding  # 2.2: the sums' bound's (1 - n u32) and (1 + u)^2

    def floor(self, rough_kth: np.ndarray) -> np.ndarray:
        """Per query: rough values below it (and above -1) belong to pairs whose float32 cosine is below the k-th
        best float32 cosine, whose rough value is rough_kth (it is at least rough_kth minus the bound, as are the
        k pairs that rank above or with it)."""
        lowest_kth = rough_kth - self.bound(np.where(np.abs(rough_kth) < 1, 2.0**-9, 2.0**-8))
        return lowest_kth - self.bound(2.0**-9)

    def candidates(self, rough: np.ndarray, floor: np.ndarray) -> np.ndarray:
        """Pairs (rough values [n, m]) that could belong to the answer: at or above the floor, or at most -1."""
        return (rough >= floor[:, None]) | (rough <= -1.0)

    def excludes(self, rough: np.ndarray, floor: np.ndarray) -> np.ndarray:
        """Whether every pair of rough value at most `rough` (per query) is outside the answer: below the floor,
        and so are the pairs at -1 or below (their float32 cosine is at most -1 + the bound)."""
        return (rough < floor) & (floor > -1.0 + self.bound(2.0**-8))


@dataclass(frozen=True)
class Rounded:
    """A block of rows normalised in float32 (`unit`; None for cached reference blocks, read again where needed),
    rounded to bfloat16 (`low`, a torch tensor), |row - rounded| of each (`error`), and its first row's position."""

    unit: np.ndarray | None
    low: object
    error: np.ndarray
    start: int = 0

    def __len__(self) -> int:
        return len(self.error)


class Bf16Search(_NumpySearch):
    """The bfloat16 candidate pass: blocks normalised as _NumpySearch normalises them, rounded to bfloat16, and
    compared by torch's bfloat16 matrix product (float32 sums, rounded to bfloat16), so that _NumpySearch.top_keys
    ranks pairs roughly. The rounded reference blocks are kept between query blocks (half the reference rows' float32
    size). `at_least` computes the pairs that could reach its threshold again in float32."""

    def __init__(self):
        super().__init__()
        self.cache: dict[int, Rounded] = {}
        self.source: tuple[np.ndarray, np.ndarray | None] | None = None  # the reference rows: (array, rows)
        self.norms = np.empty(0, dtype=np.float32)  # each reference row's norm, as normalised (1 if left as is)
        self.reference_error = 0.0  # the largest |r - rounded r| of the reference rows seen

    def unit(self, block: np.ndarray, start: int = 0) -> Rounded:
        unit = normalize(block, copy=False)
        return self._rounded(unit, start)

    def _rounded(self, unit: np.ndarray, start: int) -> Rounded:
        exact = torch.from_numpy(unit)
        low = exact.to(torch.bfloat16)
        error = torch.linalg.vector_norm(exact - low.to(torch.float32), dim=1)
        return Rounded(unit, low, error.numpy().astype(np.float64), start)

    def reference_block(self, reference: np.ndarray, rows: np.ndarray | None, start: int, stop: int) -> Rounded:
        if start not in self.cache:
            out = _rows(
                reference, rows, start, stop, self._buffer("reference", (stop - start, reference.shape[1]), np.float32)
            )
            norms = np.sqrt(np.einsum("ij,ij->i", out, out))  # scikit-learn's normalize: rows of norm < 10 eps stay
            norms[norms < 10 * np.finfo(np.float32).eps] = 1.0
            if len(self.norms) < stop:
                self.norms = np.resize(self.norms, _count(reference, rows))
            self.norms[start:stop] = norms
            block = self._rounded(out / norms[:, None], start)
            self.cache[start] = Rounded(None, block.low, block.error, start)
            self.source = (reference, rows)
            self.reference_error = max(self.reference_error, float(block.error.max(initial=0.0)))
        return self.cache[start]

    def error(self, q: Rounded, n_features: int) -> Bf16Error:
        """The bound for q's rows against the reference rows seen so far."""
        return Bf16Error(q.error, self.reference_error, n_features)

    def _cosines(self, q: Rounded, r: Rounded) -> np.ndarray:
        out = self._buffer("cosines", (len(q), len(r)), np.float32)
        torch.from_numpy(out).copy_(q.low @ r.low.T)
        return out

    def at_least(self, q: Rounded, r: Rounded, threshold: float):
        error = self.error(q, q.unit.shape[1])
        rough = self._cosines(q, r)
        i, j = np.nonzero(error.candidates(rough, threshold - error.bound(2.0**-9)))
        exact = float32_cosines(q.unit, i, r.start + j, self)
        keep = exact >= threshold
        return i[keep], j[keep], exact[keep]
