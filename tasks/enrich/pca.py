"""PCA reductions of the item vectors, as in the method: one over all domains for the mixed thread, one
per domain for the domain threads. Fitted once per build (faiss) and stored with the stage (pca.npz)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PCAFit:
    """x -> (x - mean) @ components.T, zero-padded to `out_dim`; identity when `components` is None."""

    in_dim: int
    out_dim: int
    mean: np.ndarray | None  # [D] float64
    components: np.ndarray | None  # [k, D] float64, k <= out_dim
    explained: float  # share of the variance the kept components explain (1.0 for identity)

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
        }
        if self.components is not None:
            assert self.mean is not None
            out[f"{prefix}_mean"] = self.mean
            out[f"{prefix}_components"] = self.components
        return out


def fit_pca(x: np.ndarray, dim: int) -> PCAFit:
    """Fit a PCA of [n, D] rows to `dim` components with faiss (`PCAMatrix`: the covariance in float32,
    its eigenvectors in float64, memory D x D); identity when D <= dim (the method keeps such vectors).

    With fewer rows than `dim` only n-1 components exist; the rest of the output is zero.
    Signs are fixed (largest loading positive) so refits on the same data give the same table.
    """
    import faiss

    n, d = x.shape
    if d <= dim:
        return PCAFit(d, d, None, None, 1.0)
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
    return PCAFit(d, dim, mean, components, explained)
