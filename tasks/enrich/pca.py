"""PCA reductions of the item vectors, as in the method: one over all domains for the mixed thread, one
per domain for the domain threads. Fitted once per build and stored with the stage."""

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
    """Fit a PCA of [n, D] rows to `dim` components; identity when D <= dim (the method keeps such vectors).

    With fewer rows than `dim` only n-1 components exist; the rest of the output is zero.
    Signs are fixed (largest loading positive) so refits on the same data give the same table.
    """
    n, d = x.shape
    if d <= dim:
        return PCAFit(d, d, None, None, 1.0)
    # Eigenvectors of the covariance, accumulated in chunks: memory D x D instead of a float64 copy of x.
    mean = x.astype(np.float64).mean(axis=0)
    cov = np.zeros((d, d), np.float64)
    for start in range(0, n, 65536):
        chunk = x[start : start + 65536].astype(np.float64) - mean
        cov += chunk.T @ chunk
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 0, None), eigvec[:, order]
    k = min(dim, max(n - 1, 1))
    components = eigvec[:, :k].T  # [k, D]
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    total = eigval.sum()
    explained = float(eigval[:k].sum() / total) if total > 0 else 1.0
    return PCAFit(d, dim, mean, components, explained)
