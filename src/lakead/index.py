"""Nearest-neighbour search in a gallery, three ways: the choice of ``index=`` (docs/SCALE.md).

- ``exact``: :func:`lakead.ops.nearest_neighbor`, matrix products and a min over every
  gallery vector. Its cost grows with the gallery: right for the few-shot case, and on a GPU.
- ``kdtree``: scipy's k-d tree, **exact** as well (same neighbour, same distance), and far
  cheaper on a large gallery of few channels (LAKE's sensitive neurons: 6 on a 64-channel
  block), where a tree prunes well. In many dimensions it degrades towards a full scan.
- ``hnsw``: faiss's HNSW graph, **approximate** (a query may get a vector that is not its
  nearest, so its distance can only be larger), cost nearly flat in the gallery size in any
  dimension; ``ef_search`` trades speed for exactness. Needs ``faiss-cpu`` (``lakead[index]``).
  Building one takes minutes on millions of vectors, so it is built at fit and saved with the
  model (:meth:`GalleryIndex.serialize`).
- ``auto`` (the default): ``kdtree`` for a gallery of at least :data:`AUTO_MIN_VECTORS` vectors
  of at most :data:`AUTO_MAX_DIM` channels on the CPU, else ``exact``: both exact, so ``auto``
  changes speed, never results (up to ties and float rounding).

Whatever finds the neighbour, its distance is then computed as :func:`nearest_neighbor` does,
``||q - g||`` in float32, so an exact index gives the exact search's numbers.
"""

from __future__ import annotations

import typing

import numpy as np
import torch

from .errors import ConfigError
from .fields import IndexKind
from .ops import DEFAULT_BLOCK_ELEMENTS, distance_to, nearest_neighbor

INDEX_KINDS: tuple[str, ...] = typing.get_args(IndexKind)

#: ``auto`` uses the k-d tree from this many gallery vectors on ...
AUTO_MIN_VECTORS = 100_000
#: ... when they have at most this many channels (beyond, a tree prunes too little).
AUTO_MAX_DIM = 16
#: Links per vector of the HNSW graph (faiss's ``M``) and the build's search breadth.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 80


def resolve(kind: str, n_vectors: int, dim: int, device: torch.device | str = "cpu") -> str:
    """The search ``kind`` stands for on a gallery of ``n_vectors`` x ``dim`` on ``device``.

    >>> resolve("auto", 5_000, 6), resolve("auto", 2_000_000, 6), resolve("auto", 2_000_000, 64)
    ('exact', 'kdtree', 'exact')
    """
    if kind not in INDEX_KINDS:
        raise ConfigError(f"index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    if kind != "auto":
        return kind
    cpu = torch.device(device).type == "cpu"
    return "kdtree" if cpu and n_vectors >= AUTO_MIN_VECTORS and dim <= AUTO_MAX_DIM else "exact"


def tree_bytes(n_vectors: int, dim: int) -> int:
    """About what the k-d tree of ``n_vectors`` x ``dim`` holds: scipy keeps the vectors as float64
    and an index of each (the nodes, one per ~32 vectors, add little).

    >>> tree_bytes(1_000_000, 6) // 2**20
    53
    """
    return n_vectors * (8 * dim + 8)


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("index='hnsw' needs faiss: pip install 'lakead[index]' (or faiss-cpu); "
                          "or use index='kdtree' / 'exact', which need nothing more") from e
    return faiss


class GalleryIndex:
    """A gallery ``(M, K)`` ready to be searched; ``search(queries (Q, K)) -> (distances (Q,), indices (Q,))``
    on the gallery's device, like :func:`lakead.ops.nearest_neighbor` without groups.

    ``serialized``: an HNSW index saved earlier with :meth:`serialize` (built again when ``None``).

    >>> g = torch.tensor([[3.0, 0.0], [3.0, 3.0]])
    >>> d, i = GalleryIndex(g, "kdtree").search(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    >>> d.tolist(), i.tolist()
    ([3.0, 1.0], [0, 1])
    """

    def __init__(self, gallery: torch.Tensor, kind: str = "auto", *, ef_search: int = 128,
                 serialized: np.ndarray | None = None) -> None:
        if gallery.ndim != 2:
            raise ValueError(f"expected a gallery (M, K), got {tuple(gallery.shape)}")
        self.gallery = gallery
        self.kind = resolve(kind, gallery.shape[0], gallery.shape[1], gallery.device)
        self.ef_search = int(ef_search)
        self._tree = self._hnsw = None
        if self.kind == "kdtree":
            from scipy.spatial import cKDTree

            self._tree = cKDTree(gallery.detach().cpu().numpy(), leafsize=32,
                                 balanced_tree=False, compact_nodes=False)
        elif self.kind == "hnsw":
            faiss = _faiss()
            if serialized is not None:
                self._hnsw = faiss.deserialize_index(np.ascontiguousarray(serialized, dtype=np.uint8))
                if self._hnsw.d != gallery.shape[1] or self._hnsw.ntotal != gallery.shape[0]:
                    raise ValueError(f"the saved HNSW index holds {self._hnsw.ntotal} x {self._hnsw.d} vectors, "
                                     f"the gallery {gallery.shape[0]} x {gallery.shape[1]}")
            else:
                self._hnsw = faiss.IndexHNSWFlat(gallery.shape[1], HNSW_M)
                self._hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
                self._hnsw.add(np.ascontiguousarray(gallery.detach().cpu().numpy(), dtype=np.float32))

    def serialize(self) -> np.ndarray | None:
        """The HNSW index as bytes ``(B,)`` uint8, to save with the model; ``None`` for the exact kinds."""
        return None if self._hnsw is None else _faiss().serialize_index(self._hnsw)

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "exact":
            return nearest_neighbor(queries, self.gallery)
        q = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)  # (Q, K)
        if q.shape[0] == 0:
            return nearest_neighbor(queries, self.gallery)
        if self._tree is not None:
            _, idx = self._tree.query(q, k=1)
        else:
            self._hnsw.hnsw.efSearch = self.ef_search
            _, found = self._hnsw.search(q, 1)
            idx = found[:, 0]
        idx = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(self.gallery.device)  # (Q,)
        return distance_to(queries.to(self.gallery.device), self.gallery, idx), idx

    def search_others(self, queries: torch.Tensor, query_groups: torch.Tensor, gallery_groups: torch.Tensor, *,
                      candidates: int = 16, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> torch.Tensor:
        """Each query's distance ``(Q,)`` to its nearest gallery vector of another group (leave-one-out:
        a support image's tokens against the other images'), as :func:`nearest_neighbor` with groups
        gives it, exactly, whatever the kind: with the k-d tree, the nearest of its ``candidates``
        nearest vectors that is of another group, and the exact search for the queries whose
        candidates are all of their own group; otherwise the exact search (an approximate index
        would make the thresholds, which come from these distances, approximate too)."""
        if self._tree is None or queries.shape[0] == 0:
            return nearest_neighbor(queries, self.gallery, query_groups=query_groups, gallery_groups=gallery_groups,
                                    block_elements=block_elements)[0]
        m = min(candidates, self.gallery.shape[0])
        _, idx = self._tree.query(np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32), k=m)
        idx = torch.from_numpy(np.asarray(idx, dtype=np.int64).reshape(queries.shape[0], m))  # (Q, m), nearest first
        other = gallery_groups.cpu()[idx] != query_groups.cpu().unsqueeze(1)  # (Q, m)
        found = other.any(dim=1)
        chosen = idx.gather(1, other.to(torch.int8).argmax(dim=1, keepdim=True)).squeeze(1).to(self.gallery.device)
        q = queries.to(self.gallery.device, torch.float32)
        dist = distance_to(q, self.gallery, chosen)
        rest = (~found).nonzero().squeeze(1).to(self.gallery.device)
        if rest.numel():
            dist[rest] = nearest_neighbor(q[rest], self.gallery, query_groups=query_groups.to(self.gallery.device)[rest],
                                          gallery_groups=gallery_groups.to(self.gallery.device), block_elements=block_elements)[0]
        return dist
