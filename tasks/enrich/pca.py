"""PCA reductions of the item vectors, as in the method: one over all domains for the mixed thread, one
per domain for the domain threads. Fitted with faiss and stored with the stage (pca.npz); a later build
keeps them while the catalogue grows little (`refit_reason`), so known items keep their rows and the
recommender trained on them can start warm (docs/enrich.md, "PCA tables across nights")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class PCAFit:
    """x -> (x - mean) @ components.T, zero-padded to `out_dim`; identity when `components` is None."""

    in_dim: int
    out_dim: int
    mean: np.ndarray | None  # [D] float64
    components: np.ndarray | None  # [k, D] float64, k <= out_dim
    explained: float  # share of the variance the kept components explain (1.0 for identity)
    rows: int = 0  # the rows it was fitted on (0: unknown, a build from before it was recorded)

    @property
    def identity(self) -> bool:
        return self.components is None

    def transform(self, x: np.ndarray) -> np.ndarray:
        """[n, D] -> [n, out_dim] float32."""
        if self.components is None:
            return np.ascontiguousarray(x, dtype=np.float32)
        assert self.mean is not None
        y = (x.astype(np.float64) - self.mean) @ self.components.T  # [n, k]
        out = np.zeros((x.shape[0], self.out_dim), np.float32)
        out[:, : y.shape[1]] = y
        return out

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """For np.savez: the fit under `prefix_*` keys."""
        out = {
            f"{prefix}_dims": np.array([self.in_dim, self.out_dim]),
            f"{prefix}_explained": np.array(self.explained),
            f"{prefix}_rows": np.array(self.rows),
        }
        if self.components is not None:
            assert self.mean is not None
            out[f"{prefix}_mean"] = self.mean
            out[f"{prefix}_components"] = self.components
        return out

    @classmethod
    def from_arrays(cls, arrays: np.lib.npyio.NpzFile, prefix: str) -> PCAFit:
        """The fit `arrays` (a loaded pca.npz) hold under `prefix_*`."""
        in_dim, out_dim = (int(v) for v in arrays[f"{prefix}_dims"])
        components = arrays.get(f"{prefix}_components")
        rows = arrays.get(f"{prefix}_rows")
        return cls(
            in_dim,
            out_dim,
            arrays.get(f"{prefix}_mean"),
            components,
            float(arrays[f"{prefix}_explained"]),
            int(rows) if rows is not None else 0,
        )


@dataclass(frozen=True)
class PCATables:
    """The fits of one build: over all domains (`global_fit`) and per domain (`local`, by domain name),
    fitted on the vectors of `model_id`. Saved as pca.npz: `global_*`, `local_<domain_idx>_*` and
    `local_domains` (the names by index) besides `model_id`."""

    model_id: str
    global_fit: PCAFit
    local: dict[str, PCAFit]

    def save(self, path: Path, domain_idx: dict[str, int]) -> None:
        arrays = self.global_fit.arrays("global") | {"model_id": np.array(self.model_id)}
        for name, fit in self.local.items():
            arrays |= fit.arrays(f"local_{domain_idx[name]}")
        names = sorted(self.local, key=domain_idx.__getitem__)
        arrays["local_domains"] = np.array(names, dtype=str)
        arrays["local_indices"] = np.array([domain_idx[n] for n in names], dtype=np.int64)
        np.savez(path, **arrays)  # type: ignore[arg-type]  # (named arrays)

    @classmethod
    def load(cls, path: Path) -> PCATables | None:
        """The tables a build saved; None when there are none or they are from before `model_id` and the
        domain names were recorded (such tables are refit)."""
        if not path.exists():
            return None
        with np.load(path) as arrays:
            if "model_id" not in arrays or "local_domains" not in arrays:
                return None
            local = {
                str(name): PCAFit.from_arrays(arrays, f"local_{int(d)}")
                for name, d in zip(arrays["local_domains"], arrays["local_indices"], strict=True)
            }
            return cls(str(arrays["model_id"]), PCAFit.from_arrays(arrays, "global"), local)


def refit_reason(
    previous: PCATables | None,
    model_id: str,
    dims: tuple[int, int, int],
    rows: dict[str, int],
    growth: float,
) -> str | None:
    """Why this build must fit its PCA tables anew rather than keep `previous`'s; None to keep them.

    dims: (model dim, global_dim, local_dim) asked for; rows: {"*": items with a vector, domain name: its
    items with a vector}. A table is refit when its rows grew by more than `growth` (a share) since its
    fit: fitted on most of today's items, the old basis still spans them, and keeping it keeps the known
    items' rows exactly (a refit rotates them, most where a domain has fewer items than local_dim)."""
    if previous is None:
        return "no earlier tables"
    if previous.model_id != model_id:
        return f"the embedding model changed ({previous.model_id} -> {model_id})"
    dim, global_dim, local_dim = dims
    fits = {"*": previous.global_fit, **previous.local}
    for name, fit in fits.items():
        asked = global_dim if name == "*" else local_dim
        if fit.in_dim != dim or fit.out_dim != (dim if dim <= asked else asked):
            return f"the dims changed ({fit.in_dim} -> {fit.out_dim} fitted, {dim} -> {asked} asked)"
    for name, n in rows.items():
        what = "all domains" if name == "*" else f"domain {name}"
        if name not in fits:
            return f"{what} is new"
        kept = fits[name]
        if not kept.identity and n > (1 + growth) * kept.rows:
            return (
                f"{what} grew from {kept.rows:,} to {n:,} items with a vector "
                f"(more than enrich.pca_refit_growth {growth:.0%})"
            )
    return None


def fit_pca(x: np.ndarray, dim: int) -> PCAFit:
    """Fit a PCA of [n, D] rows to `dim` components with faiss (`PCAMatrix`: the covariance in float32,
    its eigenvectors in float64, memory D x D); identity when D <= dim (the method keeps such vectors).

    With fewer rows than `dim` only n-1 components exist; the rest of the output is zero.
    Signs are fixed (largest loading positive) so refits on the same data give the same table.
    """
    import faiss

    n, d = x.shape
    if d <= dim:
        return PCAFit(d, d, None, None, 1.0, n)
    k = min(dim, max(n - 1, 1))
    pca = faiss.PCAMatrix(d, k)
    pca.max_points_per_d = -(-n // d)  # fit on every row (faiss subsamples beyond 1,000 rows per dim)
    pca.train(np.ascontiguousarray(x, np.float32))
    # PCAMat holds the eigenvectors as rows, by decreasing eigenvalue: [min(n, D), D] or more
    components = faiss.vector_to_array(pca.PCAMat).reshape(-1, d)[:k].astype(np.float64)  # [k, D]
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    components *= np.where(signs == 0, 1.0, signs)[:, None]
    eigval = np.clip(faiss.vector_to_array(pca.eigenvalues).astype(np.float64), 0, None)  # [D], decreasing
    total = eigval.sum()
    explained = float(eigval[:k].sum() / total) if total > 0 else 1.0
    mean = faiss.vector_to_array(pca.mean).astype(np.float64)  # [D]
    return PCAFit(d, dim, mean, components, explained, n)
