"""The approximate top-k index for large catalogs: faiss inverted lists over the items.

The index holds the model's items matrix [n_items, d + 1] (representation, then item
bias) under the inner-product metric, so the query [representation, 1] finds the best
LightFM scores directly (maximum inner-product search, no transform). The items are
split into about 2·√n lists by k-means (faiss IndexIVFFlat); a search scans the lists
of the NPROBE centroids nearest the query. Under a mask, a scan fetches the lists' best
k x OVERFETCH / (share allowed) unfiltered and keeps the allowed ones: when at least k
survive they are exactly the k best allowed in those lists, and scanning unfiltered costs
about half what faiss's bitmap selector does. When fewer survive (the lists hold few
allowed items: a category filter away from the query), the lists are scanned again under
the bitmap selector (np.packbits of the mask, built once per search and only if needed).
The rows returned are always the mask's: a filtered-out item is never returned.

A filter can leave out the query's own neighbourhood (a category filter without the
customer's favourite region): the best allowed items then lie in lists far from the
query's nearest centroids. So every search first scores a strided sample of the items
(SAMPLE_ROWS of them, exactly, through a small flat index, over-fetched and filtered the
same way). When none of its SPARSE_TOP best items is allowed, the nearest lists are
scanned under the selector at once (over-fetching there would be wasted). The lists of
its MIN_SEEDS best allowed sample items, and of every one of its SEEDS best that beats the
k-th item found in the nearest lists, are scanned too. When even the SEEDS-th best allowed
sample item beats the k-th result, more might have been missed: search returns None and
the scorer answers exactly.

Chosen by measurement (bench/recommendation_bench.py, README "Scoring and large
catalogs"): faiss, hnswlib and usearch graphs (HNSW) all search unfiltered in about
0.05-0.12 ms at recall@10 >= 0.98, but with 30 % of the items allowed by category their
recall fell to 0.3-0.5 (hnswlib and usearch can only over-fetch and filter in Python;
faiss's in-graph filter, and graph search seeded from the sample, reached 0.4-0.86);
inverted lists seeded from the sample keep recall@10 >= 0.95 with every filter tried
(1M x 64 clustered items: 1.000 unfiltered and 30 % allowed at random, 0.97 with 30 %
allowed by category), in about 0.35-0.8 ms (30 % at random: about 1 ms with the selector
alone, about 0.7 ms over-fetched).

The index is built once, when a model is trained (training/pipeline.py), and stored with
the artefact (artefacts.py), so activating a model never rebuilds it.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

NPROBE = 8  # lists scanned nearest the query
SEEDS = 64  # best allowed sample items; the lists of those beating the k-th found are scanned too
MIN_SEEDS = 24  # the lists of this many best seeds are scanned whatever the k-th found
SAMPLE_ROWS = 16_384  # about this many items scored exactly per search
TRAINING_POINTS_PER_LIST = 40  # k-means runs on a sample of the items
# Under a mask, a scan fetches k * OVERFETCH / (share allowed) + OVERFETCH_SLACK unfiltered
# and keeps the allowed (scanning unfiltered costs half what the bitmap selector does).
OVERFETCH = 2.0
OVERFETCH_SLACK = 16
# The nearest lists are scanned under the selector at once when the mask allows none of
# the SPARSE_TOP best sample items (about the best SPARSE_TOP x stride items: over-fetching
# from those lists would find too few allowed).
SPARSE_TOP = 12

faiss_any: Any = faiss  # its type stubs lack some of what the library has


class AnnIndexError(Exception):
    """The stored index cannot be read, or does not fit the model's items."""


def list_count(items: int) -> int:
    return max(1, min(items // 39, round(2 * math.sqrt(items))))


@dataclass(eq=False)
class AnnIndex:
    index: Any  # faiss.IndexIVFFlat, inner product
    items: InitVar[np.ndarray]  # the matrix indexed (only its strided sample is kept)
    nprobe: int = NPROBE
    seeds: int = SEEDS
    min_seeds: int = MIN_SEEDS
    sample_stride: int = field(init=False)
    sample: Any = field(init=False)  # faiss.IndexFlatIP over items[::stride]
    sample_lists: np.ndarray = field(init=False)  # int64: the list of each sample item

    def __post_init__(self, items: np.ndarray) -> None:
        self.sample_stride = max(1, self.size // SAMPLE_ROWS)
        rows = np.ascontiguousarray(items[:: self.sample_stride], dtype=np.float32)
        self.sample = faiss.IndexFlatIP(self.width)
        self.sample.add(rows)
        self.sample_lists = self.index.quantizer.search(rows, 1)[1][:, 0].astype(np.int64)
        self.index.nprobe = self.nprobe

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def width(self) -> int:
        return int(self.index.d)

    @classmethod
    def build(cls, items: np.ndarray, threads: int | None = None) -> AnnIndex:
        """Builds the index over `items` [n, d + 1] (float32; the model's items matrix)."""
        items = np.ascontiguousarray(items, dtype=np.float32)
        if threads:
            faiss.omp_set_num_threads(threads)
        lists = list_count(len(items))
        quantizer = faiss.IndexFlatIP(items.shape[1])
        index = faiss.IndexIVFFlat(quantizer, items.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
        training = np.random.default_rng(0).choice(
            len(items), min(len(items), lists * TRAINING_POINTS_PER_LIST), replace=False
        )
        index.train(items[np.sort(training)])
        index.add(items)
        return cls(index, items)

    def save(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, items: np.ndarray) -> AnnIndex:
        """Reads the index stored for `items` (the model's items matrix)."""
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise AnnIndexError(f"{path.name}: not a faiss index ({error})") from error
        if not isinstance(index, faiss.IndexIVFFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise AnnIndexError(f"{path.name}: not an inner-product IVF index")
        if (index.ntotal, index.d) != items.shape:
            raise AnnIndexError(
                f"{path.name}: built over {index.ntotal} x {index.d}, the items are {items.shape}"
            )
        return cls(index, items)

    def fits(self, items: np.ndarray) -> bool:
        """Whether the index was built over a matrix of `items`' shape."""
        return items.shape == (self.size, self.width)

    def search(
        self,
        items: np.ndarray,
        query: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        available: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The k best allowed rows (best first, ties by the lower row) and their exact scores
        from `items`; None when the index cannot vouch for its answer (fewer than k found, or
        the sample's SEEDS-th best allowed item beats the k-th found): the caller scores exactly.
        `available` is the count of `allowed` when the caller has it."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if allowed is not None and available is None:
            available = int(np.count_nonzero(allowed))
        if allowed is None or available == self.size:
            allowed, available = None, self.size
        if k <= 0 or available is None or available < k or not self.fits(items):
            return None
        mask = _Mask(allowed, self.size / max(1, available))
        nearest = self.index.quantizer.search(query, self.nprobe)[1][0]
        nearest = nearest[nearest >= 0]
        # The best allowed sample items; none allowed among the best few of the sample means
        # the filter leaves out the query's neighbourhood: its lists hold few allowed items.
        seed_scores, seeds, sparse = self._seeds(query, mask)
        rows = self._scan(query, nearest, k, mask, sparse)
        kth = self._kth(items, query, rows, k)
        # The lists of the allowed sample items that beat the k-th found (a filter that left
        # out the query's neighbourhood puts the best allowed items there).
        # Seeds come best first: the first min_seeds, and every one beating the k-th found.
        beating = max(self.min_seeds, int(np.count_nonzero(seed_scores > kth)))
        extra = np.setdiff1d(self.sample_lists[seeds[:beating]], nearest)
        if len(extra):
            rows = np.union1d(rows, self._scan(query, extra, k, mask))
            kth = self._kth(items, query, rows, k)
        if len(rows) < k or (len(seeds) == self.seeds and seed_scores[-1] > kth):
            return None  # even the last seed beats the k-th found: allowed items beyond the seeds may too
        scores = items[rows] @ query[0]
        order = np.lexsort((rows, -scores))[:k]
        return rows[order].astype(np.int64), scores[order].astype(np.float32)

    def _scan(
        self, query: np.ndarray, lists: np.ndarray, k: int, mask: _Mask, sparse: bool = False
    ) -> np.ndarray:
        """The (up to) k best allowed rows in `lists`, best first: the lists' best
        k x OVERFETCH / share scanned unfiltered, then filtered; scanned again under the
        bitmap selector when fewer than k of those are allowed (the lists hold few), or
        under it at once when the lists are known to hold few (`sparse`)."""
        wanted = mask.overfetch(k)
        params = faiss_any.SearchParametersIVF()
        if sparse:
            params.sel = mask.selector()
            return self._scan_lists(query, lists, k, params)
        fetched = self._scan_lists(query, lists, wanted, params)
        rows = mask.allowed_of(fetched)
        if mask.allowed is None or len(rows) >= k or len(fetched) < wanted:
            return rows[:k]  # k allowed found, or every item of the lists fetched
        params.sel = mask.selector()
        return self._scan_lists(query, lists, k, params)

    def _scan_lists(self, query: np.ndarray, lists: np.ndarray, k: int, params: Any) -> np.ndarray:
        probed = np.ascontiguousarray(lists, dtype=np.int64).reshape(1, -1)
        hints = np.zeros(probed.shape, dtype=np.float32)  # centroid scores: unused by flat lists
        params.nprobe = probed.shape[1]
        distances = np.empty((1, k), dtype=np.float32)
        labels = np.empty((1, k), dtype=np.int64)
        self.index.search_preassigned_c(
            1,
            faiss.swig_ptr(query),
            k,
            faiss.swig_ptr(probed),
            faiss.swig_ptr(hints),
            faiss.swig_ptr(distances),
            faiss.swig_ptr(labels),
            False,
            params,
        )
        return labels[0][labels[0] >= 0]

    def _seeds(self, query: np.ndarray, mask: _Mask) -> tuple[np.ndarray, np.ndarray, bool]:
        """The (up to) SEEDS best allowed sample items: their scores and sample positions,
        best first (over-fetched and filtered like _scan, under the selector when too few);
        and whether the mask allows none of the SPARSE_TOP best sample items."""
        wanted = min(len(self.sample_lists), mask.overfetch(self.seeds))
        scores, found = self.sample.search(query, wanted)
        scores, found = scores[0], found[0]
        keep = found >= 0
        if mask.allowed is None:
            return scores[keep][: self.seeds], found[keep][: self.seeds], False
        keep[keep] = mask.allowed[found[keep] * self.sample_stride]
        sparse = not keep[:SPARSE_TOP].any()
        scores, found = scores[keep], found[keep]
        if len(found) < self.seeds and wanted < len(self.sample_lists):
            params = faiss_any.SearchParameters()
            params.sel = mask.sample_selector(self.sample_stride)
            scores, found = self.sample.search(query, self.seeds, params=params)
            keep = found[0] >= 0
            scores, found = scores[0][keep], found[0][keep]
        return scores[: self.seeds], found[: self.seeds], sparse

    @staticmethod
    def _kth(items: np.ndarray, query: np.ndarray, rows: np.ndarray, k: int) -> float:
        """The k-th best exact score among `rows`; -inf when fewer than k."""
        if len(rows) < k:
            return float("-inf")
        return float(np.partition(items[rows] @ query[0], len(rows) - k)[len(rows) - k])


@dataclass(eq=False)
class _Mask:
    """One search's allowed mask, and its faiss bitmap selectors (built only if needed)."""

    allowed: np.ndarray | None
    inverse_share: float  # items / allowed items
    _held: list[Any] = field(default_factory=list)  # bitmaps and selectors stay referenced
    _selector: Any = None

    def overfetch(self, k: int) -> int:
        """How many to fetch unfiltered so that k of them are likely allowed."""
        if self.allowed is None:
            return k
        return math.ceil(k * self.inverse_share * OVERFETCH) + OVERFETCH_SLACK

    def allowed_of(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.allowed is None else rows[self.allowed[rows]]

    def selector(self) -> Any:
        """The bitmap selector of the mask (built once)."""
        assert self.allowed is not None
        if self._selector is None:
            self._selector = self._bitmap(self.allowed)
        return self._selector

    def sample_selector(self, stride: int) -> Any:
        """The bitmap selector of the sample's items (every stride-th)."""
        assert self.allowed is not None
        return self._bitmap(self.allowed[::stride])

    def _bitmap(self, allowed: np.ndarray) -> Any:
        bits = np.packbits(allowed, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
        self._held += [bits, selector]
        return selector
