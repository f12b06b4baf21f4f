"""The approximate top-k index for large catalogs: faiss HNSW over the items matrix.

The index holds the model's items matrix [n_items, d + 1] (representation, then item
bias) under the inner-product metric, so the query [representation, 1] finds the best
LightFM scores directly (maximum inner-product search, no transform: on clustered data
the inner-product graph had better recall at the same speed than the L2 transform, see
bench/recommendation_bench.py). faiss was chosen over hnswlib and usearch by measurement:
the three search unfiltered at about the same speed, but only faiss filters inside the
graph search with a C-level selector (a bitmap of the allowed items), so a mask costs no
Python call per visited node and no over-fetch.

A graph search honours the mask but can miss allowed items that lie far from the query
(a category filter that leaves out the customer's favourite region). Each search is
therefore checked against a strided sample of the items scored exactly (1 in
SAMPLE_STRIDE): when an allowed sample item beats the k-th result and is not among the
results, the index missed something and search returns None, so the scorer answers
exactly instead.

The index is built once, when a model is trained (training/pipeline.py), and stored with
the artefact (artefacts.py), so activating a model never rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

M = 32  # graph neighbours per node (HNSW32)
EF_CONSTRUCTION = 64
EF_SEARCH = 64  # the candidate list per search; grows as the mask narrows (search)
MAX_EF_SEARCH = 512
SAMPLE_ROWS = 16_384  # about this many items scored exactly per search to check the index


faiss_any: Any = faiss  # its type stubs lack some of what the library has


class AnnIndexError(Exception):
    """The stored index does not fit the model's items."""


@dataclass(eq=False)
class AnnIndex:
    index: faiss.IndexHNSWFlat
    ef_search: int = EF_SEARCH
    sample_stride: int = field(init=False)
    sample: np.ndarray = field(init=False)  # float32 [n / stride, d + 1]: items[::stride]

    def __post_init__(self) -> None:
        self.sample_stride = max(1, self.size // SAMPLE_ROWS)
        self.sample = np.ascontiguousarray(self.vectors()[:: self.sample_stride])

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def width(self) -> int:
        return int(self.index.d)

    def vectors(self) -> np.ndarray:
        """The items matrix the index holds (a view of faiss's storage, not a copy)."""
        storage: Any = faiss.downcast_index(self.index.storage)
        return faiss.rev_swig_ptr(storage.get_xb(), self.size * self.width).reshape(self.size, self.width)

    @classmethod
    def build(cls, items: np.ndarray, threads: int | None = None) -> AnnIndex:
        """Builds the index over `items` [n, d + 1] (float32; the model's items matrix)."""
        items = np.ascontiguousarray(items, dtype=np.float32)
        index = faiss.IndexHNSWFlat(items.shape[1], M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = EF_CONSTRUCTION
        if threads:
            faiss.omp_set_num_threads(threads)
        index.add(items)
        return cls(index)

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path) -> AnnIndex:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise AnnIndexError(f"{path.name}: not a faiss index ({error})") from error
        if not isinstance(index, faiss.IndexHNSWFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise AnnIndexError(f"{path.name}: not an inner-product HNSW index")
        return cls(index)

    def fits(self, items: np.ndarray) -> bool:
        """Whether the index was built over a matrix of `items`' shape."""
        return items.shape == (self.size, self.width)

    def search(
        self, items: np.ndarray, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The k best allowed rows (best first, ties by the lower row) and their exact scores
        from `items`; None when the index cannot vouch for its answer (fewer than k found, or
        the exact sample shows an allowed item it missed): the caller scores exactly."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        available = self.size if allowed is None else int(np.count_nonzero(allowed))
        if k <= 0 or available < k or not self.fits(items):
            return None
        params = faiss_any.SearchParametersHNSW()
        # A narrower mask leaves fewer allowed items in the same neighbourhood: look further.
        share = available / self.size
        params.efSearch = int(min(MAX_EF_SEARCH, max(self.ef_search, 2 * k) / max(share, 1e-3) ** 0.5))
        if allowed is not None and available < self.size:
            bits = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bits))
            params.sel = selector  # `bits` and `selector` stay referenced until the search returns
        _, labels = self.index.search(query, k, params=params)
        rows = labels[0]
        if np.count_nonzero(rows >= 0) < k:
            return None
        scores = items[rows] @ query[0]
        sample_scores = self.sample @ query[0]
        beaten = sample_scores > scores.min()
        if allowed is not None:
            beaten &= allowed[:: self.sample_stride]
        if np.any(~np.isin(np.flatnonzero(beaten) * self.sample_stride, rows)):
            return None
        order = np.lexsort((rows, -scores))
        return rows[order].astype(np.int64), scores[order].astype(np.float32)
