"""Exact cosine neighbour search by blocked matrix products: each query's k most similar reference rows, or every
(query, reference) pair at or above a threshold. Memory is bounded by a block (query rows x reference rows), never
by rows x rows; float32 BLAS on the CPU, the same search in PyTorch on a CUDA GPU.

Written by hand: scikit-learn's brute-force search computes a distance matrix chunk by chunk but has no cosine
fast path (its `metric="cosine"` neighbours go through a generic chunked reduction, one search per k), no GPU,
and no way to search rows of a larger array in place (the feature store's rows, without a copy of them).

Rows are L2-normalised block by block as scikit-learn's `normalize` does (a row of norm below 10 eps stays as
it is: an all-zero row has cosine 0 to everything), then compared by one float32 matrix product per block.
Order is total and deterministic: by cosine, then by reference position (the lower first). Each cosine and its
position are packed into one int64 key (the float's bits mapped to an order-preserving integer above, the
complement of the position below), so that equal cosines go to the lower position on every backend and block
size. Equal as computed: a matrix product may round a cosine by 1e-7 differently depending on where its rows fall
in the library's tiles (block sizes, thread count, numpy or torch), so two copies of one embedding can rank
either way, and cosines from different runs agree to float32 rounding, not bit for bit.

Large searches on a CPU that multiplies bfloat16 natively (`bf16_candidates`) run in two passes with the same
answer (pipeline.heads.neighbors_bf16): a bfloat16 matrix product (about 4x faster than float32 there) ranks every
pair roughly, and a proven bound on its error says which pairs could belong to the answer; only those are computed
in float32, one pair at a time: so a cosine may differ from the matrix product's by float32 rounding, and two
cosines equal to that rounding may rank the other way than the float32 search ranks them (as between blocks, above).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from sklearn.preprocessing import normalize

from pipeline.core.accelerator import cpu_multiplies_bf16

# Rows per block on the CPU: a 4,096 x 8,192 float32 block of cosines is 128 MiB, plus a mask and the two blocks
# of rows. Large enough for BLAS to run at full speed; each query block reads the reference rows once.
CPU_BLOCKS = (4096, 8192)
# On a GPU: the block's cosines and their int64 keys, 2 GiB at most.
CUDA_BLOCKS = (8192, 16384)
# A GPU keeps the normalised reference rows between query blocks when they take at most this share of its free
# memory; otherwise they are copied again for each query block.
CUDA_CACHE_SHARE = 0.25

_LOW_31 = 0x7FFFFFFF
_LOW_32 = 0xFFFFFFFF
_NO_KEY = np.iinfo(np.int64).min  # fills a row that has fewer than k candidates so far

# The bfloat16 candidate pass runs (`bf16: None`) on a CPU that multiplies bfloat16 natively, for searches of at
# least this many multiply-adds (query rows x reference rows x features; ~1 s in float32 on 2 cores): below, torch's
# import costs more than the pass saves.
BF16_WORK = 10**11


def top_k(
    queries: np.ndarray,
    reference: np.ndarray,
    k: int,
    *,
    query_rows: np.ndarray | None = None,
    reference_rows: np.ndarray | None = None,
    device: str | None = None,
    blocks: tuple[int, int] | None = None,
    bf16: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's `k` most cosine-similar reference rows, most similar first (ties: the lower position).

    `query_rows` / `reference_rows`: search these rows of `queries` / `reference` (in this order) instead of all
    of them, read block by block where they are. `device`: None for numpy (float32 BLAS), else a torch device
    ("cuda"; "cpu" runs the torch code on the CPU). `blocks`: (query rows, reference rows) per block. `bf16`: the
    bfloat16 candidate pass first (numpy only; None: `bf16_candidates` decides). Returns (cosines float32
    [n_queries, k], positions int64 [n_queries, k]), positions counting the searched reference rows (indices into
    `reference_rows` when given).
    """
    n_queries, n_reference = _count(queries, query_rows), _count(reference, reference_rows)
    if not 1 <= k <= n_reference:
        raise ValueError(f"k must be between 1 and the {n_reference} reference rows; got {k}")
    if device is None and (bf16_candidates(n_queries, n_reference, reference.shape[1]) if bf16 is None else bf16):
        from pipeline.heads.neighbors_bf16 import top_k_bf16  # imports torch: only where the pass runs

        cosines, positions, unsure = top_k_bf16(queries, reference, k, query_rows, reference_rows, blocks or CPU_BLOCKS)
        if len(unsure):  # queries whose answer the kept candidates cannot be shown to hold: float32 alone
            rows = unsure if query_rows is None else np.asarray(query_rows)[unsure]
            cosines[unsure], positions[unsure] = top_k(
                queries, reference, k, query_rows=rows, reference_rows=reference_rows, blocks=blocks, bf16=False
            )
        return cosines, positions
    cosines = np.empty((n_queries, k), dtype=np.float32)
    positions = np.empty((n_queries, k), dtype=np.int64)
    search = _NumpySearch() if device is None else _TorchSearch(device, n_reference * _width(reference))
    query_block, reference_block = blocks or (CUDA_BLOCKS if search.on_gpu else CPU_BLOCKS)
    with search.exact():
        for start in range(0, n_queries, query_block):
            stop = min(start + query_block, n_queries)
            q = search.unit(_rows(queries, query_rows, start, stop))
            keys = search.top_keys(q, _reference_blocks(search, reference, reference_rows, reference_block), k)
            cosines[start:stop], positions[start:stop] = _decode(keys)
    return cosines, positions


def pairs_at_least(
    queries: np.ndarray,
    reference: np.ndarray,
    threshold: float,
    *,
    query_rows: np.ndarray | None = None,
    reference_rows: np.ndarray | None = None,
    device: str | None = None,
    blocks: tuple[int, int] | None = None,
    bf16: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query, reference) pair of cosine >= `threshold` (float32, as computed): (query positions, reference
    positions, cosines), ordered by query then reference position. Arguments as for `top_k`; the answer grows with
    the pairs found, everything else is bounded by a block."""
    n_queries, n_reference = _count(queries, query_rows), _count(reference, reference_rows)
    if device is None and (bf16_candidates(n_queries, n_reference, reference.shape[1]) if bf16 is None else bf16):
        from pipeline.heads.neighbors_bf16 import Bf16Search  # imports torch: only where the pass runs

        search = Bf16Search()
    else:
        search = _NumpySearch() if device is None else _TorchSearch(device, n_reference * _width(reference))
    query_block, reference_block = blocks or (CUDA_BLOCKS if search.on_gpu else CPU_BLOCKS)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    with search.exact():
        for start in range(0, n_queries, query_block):
            stop = min(start + query_block, n_queries)
            q = search.unit(_rows(queries, query_rows, start, stop))
            for offset, r in _reference_blocks(search, reference, reference_rows, reference_block):
                i, j, cosine = search.at_least(q, r, threshold)
                found.append((i + start, j + offset, cosine))
    if not found:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    i, j, cosine = (np.concatenate(parts) for parts in zip(*found, strict=True))
    order = np.lexsort((j, i))
    return i[order], j[order], cosine[order]


def bf16_candidates(n_queries: int, n_reference: int, n_features: int) -> bool:
    """Whether a CPU search of this size runs the bfloat16 candidate pass first (`BF16_WORK`)."""
    return n_queries * n_reference * n_features >= BF16_WORK and cpu_multiplies_bf16()


def _count(array: np.ndarray, rows: np.ndarray | None) -> int:
    return len(array) if rows is None else len(rows)


def _width(array: np.ndarray) -> int:
    """Bytes of one row as searched (float32)."""
    return 4 * (array.shape[1] if np.ndim(array) == 2 else 1)


def _rows(
    array: np.ndarray, rows: np.ndarray | None, start: int, stop: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Rows start:stop of the searched rows as float32, copied into `out` or a new array (normalised in place next)."""
    if out is None and rows is None:
        return np.array(array[start:stop], dtype=np.float32, order="C")
    if out is None:
        return np.asarray(array[rows[start:stop]], dtype=np.float32, order="C")  # fancy indexing copies already
    if rows is None:
        np.copyto(out, array[start:stop], casting="unsafe")
    elif isinstance(array, np.ndarray) and array.dtype == np.float32:
        np.take(array, rows[start:stop], axis=0, out=out)
    else:
        out[...] = array[rows[start:stop]]
    return out


class Centred:
    """The rows of `array` minus `centre`, read as float32 where they are asked for: what a search compares in
    place of `array` for SimpleShot's CL2N (centre, then L2-normalise), without a centred copy of the rows. Both
    sides of a search are centred by the same vector (the training rows' mean)."""

    def __init__(self, array: np.ndarray, centre: np.ndarray):
        self.array, self.centre = array, np.asarray(centre, dtype=np.float32)
        self.shape, self.ndim = array.shape, array.ndim

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index) -> np.ndarray:
        rows = np.asarray(self.array[index], dtype=np.float32)
        return rows - self.centre


def _reference_blocks(
    search, reference: np.ndarray, rows: np.ndarray | None, size: int
) -> Iterator[tuple[int, object]]:
    """(position of its first row, normalised block) for each block of the searched reference rows, in order."""
    n = _count(reference, rows)
    for start in range(0, n, size):
        yield start, search.reference_block(reference, rows, start, min(start + size, n))


def _keys(cosines: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """int64 keys ordered as (cosine, -position): the float's bits as an order-preserving int32 above (negative
    floats have their 31 low bits flipped), the complement of the position below. -0.0 becomes 0.0 first, so that
    the two zeros tie."""
    bits = (cosines + np.float32(0.0)).view(np.int32)
    ordered = bits ^ ((bits >> 31) & _LOW_31)
    return (ordered.astype(np.int64) << 32) | (_LOW_32 - positions)


def _decode(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_keys` undone: (cosines float32, positions int64)."""
    ordered = (keys >> 32).astype(np.int32)
    bits = ordered ^ ((ordered >> 31) & _LOW_31)
    return bits.view(np.float32), _LOW_32 - (keys & _LOW_32)


class _NumpySearch:
    """The CPU search: numpy and its float32 BLAS. Each block's reference rows, cosines and mask are written into
    the same buffers, block after block (a fresh 100 MB array each time costs the kernel's page zeroing too)."""

    on_gpu = False

    def __init__(self):
        self._buffers: dict[str, np.ndarray] = {}

    def _buffer(self, name: str, shape: tuple[int, int], dtype: type) -> np.ndarray:
        """A C-contiguous array of `shape`, the same memory each time `name` asks again (grown when too small)."""
        size = shape[0] * shape[1]
        if name not in self._buffers or self._buffers[name].size < size:
            self._buffers[name] = np.empty(size, dtype=dtype)
        return self._buffers[name][:size].reshape(shape)

    @contextmanager
    def exact(self) -> Iterator[None]:
        yield

    def unit(self, block: np.ndarray) -> np.ndarray:
        return normalize(block, copy=False)

    def reference_block(self, reference: np.ndarray, rows: np.ndarray | None, start: int, stop: int) -> np.ndarray:
        out = self._buffer("reference", (stop - start, reference.shape[1]), np.float32)
        return self.unit(_rows(reference, rows, start, stop, out))

    def _cosines(self, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        return np.matmul(q, r.T, out=self._buffer("cosines", (len(q), len(r)), np.float32))

    def _mask(self, compare, cosines: np.ndarray, bound) -> np.ndarray:
        return compare(cosines, bound, out=self._buffer("mask", cosines.shape, np.bool_))

    def at_least(self, q: np.ndarray, r: np.ndarray, threshold: float):
        cosines = self._cosines(q, r)
        i, j = np.nonzero(self._mask(np.greater_equal, cosines, np.float32(threshold)))
        return i, j, cosines[i, j]

    def top_keys(self, q: np.ndarray, blocks: Iterator[tuple[int, np.ndarray]], k: int) -> np.ndarray:
        """The k largest keys of each query row over every reference block, largest first.

        Blocks come in position order, so a later block's cosine equal to the k-th best so far ranks below it:
        only cosines above the running k-th best are candidates. The first block's own k-th largest cosine (ties
        kept) bounds its candidates. Candidates are few per row after the first blocks, so keys are built for
        them alone, not for the whole block.
        """
        n = len(q)
        top = np.full((n, k), _NO_KEY, dtype=np.int64)
        bound = np.full(n, -np.inf, dtype=np.float32)
        for offset, r in blocks:
            cosines = self._cosines(q, r)
            width = cosines.shape[1]
            if offset == 0 and width >= k:
                kth = np.partition(cosines, width - k, axis=1)[:, width - k]
                rows, cols = np.nonzero(self._mask(np.greater_equal, cosines, kth[:, None]))
            else:
                rows, cols = np.nonzero(self._mask(np.greater, cosines, bound[:, None]))
            if not len(rows):
                continue
            keys = _keys(cosines[rows, cols], cols + offset)
            counts = np.bincount(rows, minlength=n)
            candidates = np.full((n, int(counts.max())), _NO_KEY, dtype=np.int64)
            candidates[rows, np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]] = keys
            merged = np.concatenate([top, candidates], axis=1)
            top = np.partition(merged, merged.shape[1] - k, axis=1)[:, -k:]
            kth_key = top.min(axis=1)
            bound = np.where(kth_key == _NO_KEY, -np.inf, _decode(kth_key)[0]).astype(np.float32)
        return np.sort(top, axis=1)[:, ::-1]


class _TorchSearch:
    """The same search in PyTorch on `device`: blocks are copied there, normalised and compared there, and each
    block's k largest keys merged with torch.topk. On a GPU the normalised reference blocks stay on it between
    query blocks when they fit (`CUDA_CACHE_SHARE` of its free memory)."""

    def __init__(self, device: str, reference_bytes: int):
        import torch  # only where the torch search was asked for (pipeline.core.accelerator.use_cuda)

        self.torch, self.device = torch, torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        fits = self.on_gpu and reference_bytes <= CUDA_CACHE_SHARE * torch.cuda.mem_get_info(self.device)[0]
        self.cache: dict[int, object] | None = {} if fits else None

    @contextmanager
    def exact(self) -> Iterator[None]:
        """float32 products in full precision: TF32 (a 10-bit mantissa) would move a cosine by about 1e-3, enough to
        change neighbours and cross a threshold. Set for the search, then put back as it was."""
        before = self.torch.get_float32_matmul_precision()
        self.torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            self.torch.set_float32_matmul_precision(before)

    def unit(self, block: np.ndarray):
        """scikit-learn's `normalize`, on the device: rows of norm below 10 eps are left as they are."""
        x = self.torch.from_numpy(block).to(self.device)
        norms = self.torch.linalg.vector_norm(x, dim=1, keepdim=True)
        return x / self.torch.where(norms < 10 * np.finfo(np.float32).eps, 1.0, norms)

    def reference_block(self, reference: np.ndarray, rows: np.ndarray | None, start: int, stop: int):
        if self.cache is None:
            return self.unit(_rows(reference, rows, start, stop))
        if start not in self.cache:
            self.cache[start] = self.unit(_rows(reference, rows, start, stop))
        return self.cache[start]

    def at_least(self, q, r, threshold: float):
        cosines = q @ r.T
        i, j = self.torch.nonzero(cosines >= threshold, as_tuple=True)
        return i.cpu().numpy(), j.cpu().numpy(), cosines[i, j].cpu().numpy()

    def _keys(self, cosines, offset: int):
        """`_keys` on the device, in place where it can be: at most 16 bytes a pair (cosine, int32 order, key)."""
        torch = self.torch
        cosines += 0.0  # -0.0 becomes 0.0
        bits = cosines.view(torch.int32)
        ordered = bits >> 31
        ordered &= _LOW_31
        ordered ^= bits
        keys = ordered.to(torch.int64)
        del ordered
        keys <<= 32
        keys |= _LOW_32 - torch.arange(offset, offset + cosines.shape[1], device=self.device, dtype=torch.int64)
        return keys

    def top_keys(self, q, blocks: Iterator[tuple[int, object]], k: int) -> np.ndarray:
        top = None
        for offset, r in blocks:
            keys = self._keys(q @ r.T, offset)
            keys = self.torch.topk(keys, min(k, keys.shape[1]), dim=1).values
            if top is not None:
                keys = self.torch.cat([top, keys], dim=1)
                keys = self.torch.topk(keys, min(k, keys.shape[1]), dim=1).values
            top = keys
        return top.cpu().numpy()  # topk's values come largest first
