"""A model version's artefact in the model directory: written atomically, checked on load.

<model_dir>/<version>/ holds
- arrays.npz: the float32 embeddings and biases, and the two sparse feature matrices
  (CSR parts), saved without pickles;
- maps.json: the id and feature-name lists (row i of an array is entry i of its list);
- metadata.json: options, evaluation, data cursor, timings, library versions;
- items.faiss (large catalogs only): the approximate top-k index over the items
  (serving/ann_index.py), built at training so activating never rebuilds it;
- manifest.json: the SHA-256 of each file above, and the artefact's checksum (SHA-256 of
  the sorted "name sha256" lines), which the registry records in the database.

A writer fills a temporary directory beside the target and renames it into place, so a
reader sees a whole artefact or none; a reader verifies every file against the manifest
(and the manifest against the checksum the database holds) before using any of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse

if TYPE_CHECKING:
    from services.recommendation.serving.ann_index import AnnIndex

ARRAYS = "arrays.npz"
MAPS = "maps.json"
METADATA = "metadata.json"
MANIFEST = "manifest.json"
ANN_INDEX = "items.faiss"  # optional
REQUIRED = (ARRAYS, MAPS, METADATA)
DENSE = (
    "item_embeddings",
    "item_biases",
    "customer_embeddings",
    "customer_biases",
    "item_feature_embeddings",
    "item_feature_biases",
    "customer_feature_embeddings",
    "customer_feature_biases",
)
SPARSE = ("item_features", "customer_features")
LISTS = ("item_ids", "customer_ids", "item_feature_names", "customer_feature_names")


class ArtefactError(Exception):
    """The artefact is missing, incomplete or does not match its checksum."""


@dataclass(frozen=True)
class ModelArtefact:
    version: str  # assigned by the registry before writing
    item_ids: list[str]  # row i of item arrays is item_ids[i]
    customer_ids: list[str]  # row j of customer arrays
    item_embeddings: np.ndarray  # float32 [n_items, d] (item representations: features summed)
    item_biases: np.ndarray  # float32 [n_items]
    customer_embeddings: np.ndarray  # float32 [n_customers, d]
    customer_biases: np.ndarray  # float32 [n_customers]
    item_feature_embeddings: np.ndarray  # float32 [n_item_features, d]
    item_feature_biases: np.ndarray  # float32 [n_item_features]
    customer_feature_embeddings: np.ndarray  # float32 [n_customer_features, d]
    customer_feature_biases: np.ndarray  # float32 [n_customer_features]
    item_feature_names: list[str]  # "item:ink-black-xl", "category:office/ink", "brand:x", ...
    customer_feature_names: list[str]  # "customer:demo-aiko", "age_range:25-34", ...
    item_features: scipy.sparse.csr_matrix  # [n_items, n_item_features] float32, normalised weights
    customer_features: scipy.sparse.csr_matrix  # [n_customers, n_customer_features]
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON-able
    ann_index: AnnIndex | None = None  # over [item_embeddings, item_biases]; large catalogs only


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_of(files: dict[str, str]) -> str:
    """The artefact's checksum from its files' digests (name -> sha256 hex)."""
    lines = "".join(f"{name} {files[name]}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _arrays_of(artefact: ModelArtefact) -> dict[str, np.ndarray]:
    arrays = {name: np.ascontiguousarray(getattr(artefact, name), dtype=np.float32) for name in DENSE}
    for name in SPARSE:
        matrix = scipy.sparse.csr_matrix(getattr(artefact, name), dtype=np.float32)
        arrays[f"{name}.data"] = matrix.data
        arrays[f"{name}.indices"] = matrix.indices.astype(np.int32)
        arrays[f"{name}.indptr"] = matrix.indptr.astype(np.int64)
        arrays[f"{name}.shape"] = np.asarray(matrix.shape, dtype=np.int64)
    return arrays


def write_artefact(model_dir: Path, artefact: ModelArtefact) -> str:
    """Writes the artefact to <model_dir>/<version> atomically; returns its checksum.

    Raises FileExistsError when that version is already there (versions are never reused).
    """
    if not artefact.version or "/" in artefact.version or artefact.version.startswith("."):
        raise ValueError(f"bad model version {artefact.version!r}")
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / artefact.version
    if target.exists():
        raise FileExistsError(f"model artefact {target} already exists")
    temporary = model_dir / f".tmp-{artefact.version}-{uuid.uuid4().hex}"
    temporary.mkdir()
    try:
        np.savez(temporary / ARRAYS, allow_pickle=False, **_arrays_of(artefact))  # type: ignore[arg-type]
        maps = {name: list(getattr(artefact, name)) for name in LISTS}
        (temporary / MAPS).write_text(json.dumps(maps))
        (temporary / METADATA).write_text(json.dumps({"version": artefact.version, **artefact.metadata}))
        names: tuple[str, ...] = REQUIRED
        if artefact.ann_index is not None:
            artefact.ann_index.save(temporary / ANN_INDEX)
            names += (ANN_INDEX,)
        files = {name: _sha256(temporary / name) for name in names}
        checksum = checksum_of(files)
        (temporary / MANIFEST).write_text(json.dumps({"files": files, "sha256": checksum}, sort_keys=True))
        for name in (*names, MANIFEST):
            _fsync(temporary / name)
        _fsync(temporary)
        # The rename is the commit: readers see the whole artefact or nothing.
        os.rename(temporary, target)
        _fsync(model_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return checksum


def read_artefact(model_dir: Path, version: str, expected_sha256: str | None = None) -> ModelArtefact:
    """Reads and verifies <model_dir>/<version>; raises ArtefactError when any file is missing
    or differs from the manifest, or the manifest from `expected_sha256` (the database's)."""
    directory = model_dir / version
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        if not set(REQUIRED) <= set(files) <= {*REQUIRED, ANN_INDEX}:
            raise ArtefactError(f"model {version}: the manifest lists {sorted(files)}")
        checksum = checksum_of(files)
        if checksum != manifest["sha256"] or (expected_sha256 and checksum != expected_sha256):
            raise ArtefactError(f"model {version}: the manifest does not match the recorded checksum")
        for name, digest in files.items():
            if _sha256(directory / name) != digest:
                raise ArtefactError(f"model {version}: {name} does not match its checksum")
        maps = json.loads((directory / MAPS).read_text())
        metadata = json.loads((directory / METADATA).read_text())
        with np.load(directory / ARRAYS, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except ArtefactError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ArtefactError(f"model {version}: unreadable artefact ({error})") from error
    sparse = {
        name: scipy.sparse.csr_matrix(
            (arrays[f"{name}.data"], arrays[f"{name}.indices"], arrays[f"{name}.indptr"]),
            shape=tuple(int(n) for n in arrays[f"{name}.shape"]),
        )
        for name in SPARSE
    }
    metadata.pop("version", None)
    fields: dict[str, Any] = {name: list(maps[name]) for name in LISTS}
    fields.update({name: arrays[name] for name in DENSE}, **sparse)
    artefact = ModelArtefact(version=version, metadata=metadata, **fields)
    return _with_ann_index(artefact, directory / ANN_INDEX) if ANN_INDEX in files else artefact


def _with_ann_index(artefact: ModelArtefact, path: Path) -> ModelArtefact:
    from services.recommendation.serving.ann_index import AnnIndex, AnnIndexError
    from services.recommendation.serving.model import items_matrix

    try:
        return replace(artefact, ann_index=AnnIndex.load(path, items_matrix(artefact)))
    except AnnIndexError as error:
        raise ArtefactError(f"model {artefact.version}: {error}") from error
