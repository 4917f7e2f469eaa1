"""Activation-aware truncated SVD: E [N, K] ≈ U [N, r] · V [r, K], best for the output error ||X (E − UV)^T||.

With C = X^T X / n = L L^T (Cholesky, damped), ||X A^T||_F = ||A L||_F, so the best rank-r A in that norm is
the truncated SVD of E L mapped back: E L = P Σ Q^T  ->  U = P_r Σ_r^½,  V = Σ_r^½ Q_r^T L^-1 (balanced
factors quantize better). Without calibration (C = I) this is the plain SVD.

We use it on the *quantization residual* E = W − Ŵ (LQER-style "bits + rank"), not on W itself: trained
experts have flat spectra, so plain low rank of W collapses beyond ~10 % reduction, while the residual of a
few-bit quantizer is what a handful of directions in activation space can still fix. Whether that pays
at equal bytes is measured, per expert, by the mixed-precision plan (mixed.py), never assumed.

Measured so far: `python -m moe_offload.quant.bench --lowrank` (a random 512×384 expert) puts
2/3-bit + rank 8/16/32 strictly above the 2-3-4-8-bit hull (e.g. 2b+r32: 261632 B, err 0.273 vs 3b: 240768
B, err 0.170), also with activation-aware whitening on correlated inputs; on the random tiny test checkpoint
the same. On the trained bundled model (docs/quality.md), with calibration, 2b+r8/r16 and 3b+r16 do reach the
hull of output error on held-out calibration rows and the plan takes them for 7-23 of 48 experts, but the
held-out perplexity at equal bytes came out no better than without them (within the noise, or worse).
`quantize --lowrank auto` therefore only ever offers the options; the plan takes them where they measure
better.

Shape legend: N output rows, K inputs, n calibration rows, r rank.
"""

from __future__ import annotations

import torch

DAMP = 0.01  # fraction of mean(diag C) added to the diagonal: calibration rarely spans all of K


def whitener(x: torch.Tensor | None = None, cov: torch.Tensor | None = None, damp: float = DAMP):
    """x [n, K] (or cov [K, K]) -> lower-triangular L [K, K], L L^T = C + damp·mean(diag C)·I; else None."""
    if cov is None:
        if x is None:
            return None
        x = x.double()
        cov = x.t() @ x / max(x.shape[0], 1)
    cov = cov.double()
    d = damp * cov.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.cholesky(cov + d * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device))


def svd(E: torch.Tensor, L: torch.Tensor | None = None):
    """E [N, K] -> (P [N, m], S [m], Qt [m, K]) of E·L (or E)."""
    A = E.double() if L is None else E.double() @ L
    return torch.linalg.svd(A, full_matrices=False)


def factor(E: torch.Tensor, rank: int, L: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r U [N, r], V [r, K] for E in the (whitened) Frobenius norm; fp32."""
    P, S, Qt = svd(E, L)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    U = P[:, :r] * root
    V = root[:, None] * Qt[:r]
    if L is not None:  # V L = root·Qt  ->  V = root·Qt·L^-1, i.e. solve L^T V^T = (root·Qt)^T
        V = torch.linalg.solve_triangular(L.t(), V.t(), upper=True).t()
    return U.float(), V.float()


def error(W: torch.Tensor, W_hat: torch.Tensor, L: torch.Tensor | None = None) -> float:
    """Relative error ||(W − Ŵ) L|| / ||W L|| (L = None: plain Frobenius)."""
    D = (W.double() - W_hat.double())
    Wd = W.double()
    if L is not None:
        D, Wd = D @ L, Wd @ L
    return float(D.norm() / Wd.norm().clamp_min(1e-30))


def rank_for_error(E: torch.Tensor, W: torch.Tensor, target: float, L: torch.Tensor | None = None,
                   max_rank: int | None = None) -> int:
    """Smallest r with ||(E − U V) L|| / ||W L|| <= target (from the singular values; no refactoring).
    Returns max_rank (or full rank) when the target cannot be met."""
    _, S, _ = svd(E, L)
    ref = (W.double() if L is None else W.double() @ L).norm()
    tail = S.flip(0).pow(2).cumsum(0).flip(0).sqrt()  # tail[r] = error left after keeping r directions
    limit = S.numel() if max_rank is None else min(max_rank, S.numel())
    for r in range(limit + 1):
        left = tail[r] if r < S.numel() else torch.zeros((), dtype=S.dtype)
        if left <= target * ref:
            return r
    return limit


def breakeven_rank(N: int, K: int) -> int:
    """Rank above which dense factors cost more than the matrix: r = NK / (N + K)."""
    return N * K // (N + K)
