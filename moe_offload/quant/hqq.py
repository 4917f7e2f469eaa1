"""Half-quadratic quantization (HQQ, Badri & Shaji 2023) and round-to-nearest: pure tensors in, tensors out.

A weight W [N, K] is cut into groups of g consecutive inputs (axis=1) and approximated as

    W ≈ s · (Q − z)        Q ∈ {0 … 2^b − 1} per weight; scale s and zero z per group.

Round-to-nearest (RTN) takes s, z from each group's min/max. HQQ keeps that s and fits z (optionally s too)
to the sparsity-promoting loss ||W − s(Q − z)||_p^p, p < 1, by half-quadratic splitting: an extra variable
We ≈ W − s(Q − z) is shrunk with the lp proximal operator, then z has a closed form (a group mean):

    Q  = clamp(round(W / s + z))
    We = shrink_p(W − s(Q − z), β)            shrink_p(x) = sign(x)·relu(|x| − |x|^(p−1) / β)
    z  = mean_g(Q − (W − We) / s)         (opt_scale, our default: also s = <W − We, Q − z> / <Q − z, Q − z>)
    β ← κβ

No calibration data is used unless `importance` is given: then every quadratic step (error, s refit, z mean)
is weighted per input column by h_j = E[x_j²] of calibration inputs (activation-aware HQQ; `fit`).
We keep, per group, the z (and s) with the lowest (weighted) squared error seen.
Our default also refits s (opt_scale), a least-squares step the paper leaves out: it is what makes 2-bit
usable. `python -m moe_offload.quant.bench --errors` (1024×4096, relative Frobenius error, Gaussian):

    bits group  bits/w    RTN    HQQ (z only)  HQQ + s refit     Student-t(3): RTN / HQQ / HQQ+s
    2    32     2.53      0.393  0.371         0.309             0.506 / 0.468 / 0.410
    2    16     3.06      0.327  0.301         0.269             (dominated by 3-bit g64: not a default)
    3    64     3.27      0.192  0.183         0.168             0.283 / 0.269 / 0.251
    4    64     4.27      0.090  0.086         0.084             0.131 / 0.125 / 0.123
    8    row    8.01      0.008  0.008         0.008             0.032 / 0.032 / 0.032
    one 14336×4096 matrix, 1 thread: RTN 1.0 s, HQQ 7.9 s (the hqq package: 26-57 s, DESIGN.md)

HQQ with the z-only update matches the `hqq` package's quantizer within 1 % of its error on these matrices
(tests/test_quant.py::test_our_hqq_matches_the_hqq_package, run with hqq 0.2.8 on PYTHONPATH).

Meta-data (s, z per group) is stored in one of two ways — the choice decides bits/weight:
  meta_bits=16  s and m = s·(c − z) as bf16 pairs [G, N, 2], exactly the int4pack kernel's
                `scales_and_zeros` (c is the code centre: 8 for b <= 4, 128 for b = 8); b + 32/g bits/weight
  meta_bits=8   s and z each as 8-bit codes, RTN in blocks of 128 consecutive values of the [G, N] array
                with an fp32 (min, step) per block (the paper's "meta-data quantization");
                b + 2·(8 + 64/128)/g = b + 17/g bits/weight. The codec's default for 2/3 bits (their
                codes are expanded at load anyway): it changed no error above in the 4th digit (tests
                assert < 1 %), and saves 0.23 bits/weight at g64. 4-bit experts store meta_bits=16 (the
                table's 4.27 is this 8-bit meta): loaded, they are views of the stored bytes (codec.py).
Either way the weight the runtime sees is w = (q − c)·s + m with bf16 s and m, and the codes are re-rounded
against exactly those values (`requantize`), so codes and stored meta are always consistent.

Shape legend: N output rows, K inputs, g group size, G = K/g groups per row, B meta blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

META_BLOCK = 128  # meta values per (min, step) pair when meta_bits=8


def centre(bits: int) -> int:
    """The code c at which the stored offset m sits: 8 lets every b <= 4 use the int4 kernel as is."""
    return 128 if bits == 8 else 8


def group_size_for(K: int, group_size: int | None) -> int:
    """Effective group: 0/None or >= K means one group per row; otherwise the largest divisor of K <= it."""
    if not group_size or group_size >= K:
        return K
    g = int(group_size)
    while K % g:
        g -= 1
    return g


def _minmax(Wg: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Wg [R, G, g] -> s, z [R, G, 1]; a constant group c gets s = |c|/maxq (exact reconstruction)
    mn, mx = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)
    rng = mx - mn
    flat = torch.maximum(mn.abs(), mx.abs()).clamp_min(1e-12)
    s = torch.where(rng > 1e-7 * flat, rng, flat) / maxq
    return s, -mn / s


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp_min(1e-8).pow(p - 1) / beta)


def _range_search(Wg, maxq, s, z, h, steps):
    """Per group, the (s, z) of the min/max range shrunk by α ∈ {1, …, 0.5} (steps values) around its centre
    with the lowest h-weighted squared error: at 2-3 bits clipping outliers of unimportant columns pays,
    and HQQ's updates alone stay near their min/max start."""
    mid = (Wg.amax(-1, keepdim=True) + Wg.amin(-1, keepdim=True)) / 2
    rng = s * maxq
    best = (s, z, torch.full_like(s, float("inf")))
    for a in torch.linspace(1.0, 0.5, steps).tolist():
        sa = (a * rng / maxq).clamp_min(1e-12)
        za = -(mid - a * rng / 2) / sa
        Q = torch.round(Wg / sa + za).clamp_(0, maxq)
        err = ((Wg - sa * (Q - za)).pow(2) * h).sum(-1, keepdim=True)
        better = err < best[2]
        best = tuple(torch.where(better, new, old) for new, old in zip((sa, za, err), best))
    return best[0], best[1]


def _fit_rows(Wg, maxq, optimize, iters, lp_norm, beta, kappa, opt_scale, h=None, search=0):
    # h: None, or the importance of each input column as [1, G, g] (> 0): every quadratic step below is then
    # the h-weighted one (weighted error, weighted least-squares s, weighted mean z). The lp shrink is the
    # proximal step of Σ h|We|^p + β/2 Σ h (We − R)², in which h cancels: it is unchanged.
    s, z = _minmax(Wg, maxq)
    if not optimize:
        return s, z
    best_s, best_z = s.clone(), z.clone()
    best_err = torch.full_like(s, float("inf"))
    s_min = s / 4  # weighted: a group ruled by one column could let s collapse
    # (its weight exact, the rest one constant, z huge): keep the range at least a quarter of min/max's
    if h is not None and search:  # start from the best of a few ranges shrunk around the group's centre
        s, z = _range_search(Wg, maxq, s, z, h, search)
    for _ in range(iters):
        Q = torch.round(Wg / s + z).clamp_(0, maxq)
        R = Wg - s * (Q - z)  # residual
        err = (R.pow(2) if h is None else R.pow(2) * h).sum(-1, keepdim=True)
        better = err < best_err
        if not better.any():
            break
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        T = Wg - _shrink(R, beta, lp_norm)  # the part of W the codes should reproduce
        d = Q - z
        if opt_scale:
            hd = d if h is None else d * h
            s = (T * hd).sum(-1, keepdim=True) / (d * hd).sum(-1, keepdim=True).clamp_min(1e-12)
            s = s.clamp_min(1e-12) if h is None else torch.maximum(s, s_min)
        if h is None:
            z = (Q - T / s).mean(-1, keepdim=True)
        else:
            z = ((Q - T / s) * h).sum(-1, keepdim=True) / h.sum(-1, keepdim=True)
        beta *= kappa
    return best_s, best_z


def importance_weights(x: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Calibration inputs x [n, K] -> the per-column importance h_j = E[x_j²] [K], normalised to mean 1,
    plus `floor` (then renormalised): floor > 0 keeps columns the calibration text never lit from being
    ignored. The error the output of W x sees from a weight error on column j grows with E[x_j²]
    (diagonal of the input second moment: the AWQ/GPTQ proxy, cross terms dropped)."""
    h = x.float().pow(2).mean(0)
    h = h / h.mean().clamp_min(1e-30)
    if floor:
        h = (h + floor) / (1 + floor)
    return h.clamp_min(1e-6)


def fit(W: torch.Tensor, bits: int, group_size: int | None, method: str = "hqq", *, iters: int = 20,
        lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01, opt_scale: bool = True,
        rows_per_chunk: int | None = None, importance: torch.Tensor | None = None, search: int = 0
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> scale s, zero z [N, G] fp32 (method 'hqq' or 'rtn'); codes follow from `requantize`.
    importance [K] (optional, > 0; hqq only): fit s, z to the column-weighted error Σ_j h_j (w_ij − ŵ_ij)²
    instead of the plain one — activation-aware HQQ (h from `importance_weights`). Uniform h gives the
    unweighted fit; the storage format and kernels are the same either way. search > 0 (with importance):
    start each group from the best of `search` min/max ranges shrunk by 1 … 0.5 (`_range_search`); it lowers
    the weighted error further but did worse on held-out text than plain weighting (docs/quality.md), so
    the codec does not use it."""
    if method not in ("hqq", "rtn"):
        raise ValueError(f"unknown quantizer {method!r}: hqq or rtn")
    N, K = W.shape
    g = group_size_for(K, group_size)
    maxq = 2**bits - 1
    h = None
    if importance is not None:
        if importance.shape != (K,):
            raise ValueError(f"importance has shape {tuple(importance.shape)}, expected ({K},)")
        h = importance.float().reshape(1, K // g, g)
    step = rows_per_chunk or max(1, (1 << 18) // K)  # ~256K weights per chunk: temporaries stay in cache (3x)
    s_out, z_out = [], []
    for r in range(0, N, step):
        Wg = W[r:r + step].float().reshape(-1, K // g, g)
        s, z = _fit_rows(Wg, maxq, method == "hqq", iters, lp_norm, beta, kappa, opt_scale, h, search)
        s_out.append(s[..., 0])
        z_out.append(z[..., 0])
    return torch.cat(s_out), torch.cat(z_out)


# ---- meta-data ---------------------------------------------------------------------------------------

def _q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # x [n] fp32 -> codes uint8 [n], (min, step) fp32 [B, 2]; blocks of META_BLOCK, the last one padded
    n = x.numel()
    pad = -n % META_BLOCK
    xb = torch.cat([x, x[-1:].expand(pad)]).view(-1, META_BLOCK)
    mn, mx = xb.amin(1, keepdim=True), xb.amax(1, keepdim=True)
    step = torch.where(mx > mn, (mx - mn) / 255, torch.ones_like(mn))
    codes = torch.round((xb - mn) / step).clamp_(0, 255).to(torch.uint8).view(-1)[:n]
    return codes, torch.cat([mn, step], 1)


def _dq8(codes: torch.Tensor, minstep: torch.Tensor) -> torch.Tensor:
    """8-bit meta codes [n] -> fp32 [n]: min + code·step per block of META_BLOCK (no padded copy)."""
    n = codes.numel()
    out = torch.empty(n, device=codes.device)
    full = n - n % META_BLOCK
    for a, b, w, ms in ((0, full, META_BLOCK, minstep[: full // META_BLOCK]),
                        (full, n, n - full, minstep[full // META_BLOCK:])):
        if b > a:
            f = out[a:b].view(-1, w)
            f.copy_(codes[a:b].view(f.shape))
            f.mul_(ms[:, 1:]).add_(ms[:, :1])
    return out


def meta_nbytes(N: int, G: int, meta_bits: int) -> int:
    if meta_bits == 16:
        return G * N * 2 * 2
    if meta_bits == 8:
        return 2 * (G * N + -(-G * N // META_BLOCK) * 8)
    raise ValueError(f"meta_bits must be 8 or 16, got {meta_bits}")


def encode_meta(s: torch.Tensor, z: torch.Tensor, bits: int, meta_bits: int) -> dict[str, torch.Tensor]:
    """s, z [N, G] fp32 -> the stored meta tensors (in [G, N] order)."""
    if meta_bits == 16:
        m = s * (centre(bits) - z)
        return {"sm": torch.stack([s.t(), m.t()], -1).to(torch.bfloat16).contiguous()}  # [G, N, 2]
    if meta_bits == 8:
        sc, sb = _q8(s.t().reshape(-1))
        zc, zb = _q8(z.t().reshape(-1))
        return {"s8": sc, "z8": zc, "s8_minstep": sb, "z8_minstep": zb}
    raise ValueError(f"meta_bits must be 8 or 16, got {meta_bits}")


def decode_meta(meta: dict[str, torch.Tensor], N: int, G: int, bits: int) -> torch.Tensor:
    """Stored meta -> scales_and_zeros bf16 [G, N, 2]: (s, m) with w = (q − c)·s + m."""
    if "sm" in meta:
        return meta["sm"].view(G, N, 2)
    s = _dq8(meta["s8"], meta["s8_minstep"].float())
    z = _dq8(meta["z8"], meta["z8_minstep"].float())
    out = torch.empty(G * N, 2, dtype=torch.bfloat16, device=s.device)  # written in place: no fp32 stack
    out[:, 0].copy_(s)
    out[:, 1].copy_(z.neg_().add_(centre(bits)).mul_(s))  # s·(c − z), rounded once to bf16 as before
    return out.view(G, N, 2)


# ---- codes --------------------------------------------------------------------------------------------

def _expand(t: torch.Tensor, g: int) -> torch.Tensor:  # [G, N] -> [N, K]
    return t.t().float().repeat_interleave(g, dim=1)


def requantize(W: torch.Tensor, sz: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes for W [N, K] under stored scales_and_zeros [G, N, 2] -> uint8 [N, K]."""
    K = W.shape[1]
    g = K // sz.shape[0]
    s, m = _expand(sz[..., 0], g), _expand(sz[..., 1], g)
    return torch.round((W.float() - m) / s + centre(bits)).clamp_(0, 2**bits - 1).to(torch.uint8)


def affine_(f: torch.Tensor, s: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
    """In place f·s + m0 on fp32 codes f [R, G, g] (m0 = m − c·s, [R, G, 1]): the dequantisation formula."""
    return f.mul_(s).add_(m0)


def dequantize(codes: torch.Tensor, sz: torch.Tensor, bits: int, dtype=torch.float32) -> torch.Tensor:
    """codes uint8 [N, K], scales_and_zeros [G, N, 2] -> W [N, K] = (q − c)·s + m, computed in fp32."""
    N, K = codes.shape
    G = sz.shape[0]
    s, m = sz[..., 0].t().float()[..., None], sz[..., 1].t().float()[..., None]  # [N, G, 1]
    w = affine_(codes.reshape(N, G, K // G).float(), s, m - centre(bits) * s)
    return w.view(N, K).to(dtype)


@dataclass
class Quantized:
    """One quantized matrix: codes [N, K] (uint8, row-major), the stored meta, and its bf16 view."""

    codes: torch.Tensor
    meta: dict[str, torch.Tensor]
    sz: torch.Tensor  # [G, N, 2] bf16 (s, m)
    bits: int
    group_size: int

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.sz, self.bits, dtype)


def quantize(W: torch.Tensor, bits: int, group_size: int | None, meta_bits: int = 8, method: str = "hqq",
             **opts) -> Quantized:
    """W [N, K] -> Quantized: fit s, z (HQQ or RTN), store the meta, re-round the codes against it."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"unsupported bit width {bits}; choose 2, 3, 4 or 8")
    N, K = W.shape
    g = group_size_for(K, group_size)
    s, z = fit(W, bits, g, method, **opts)
    meta = encode_meta(s, z, bits, meta_bits)
    sz = decode_meta(meta, N, K // g, bits)
    return Quantized(requantize(W, sz, bits), meta, sz, bits, g)


def rel_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """||W − Ŵ||_F / ||W||_F."""
    W = W.float()
    return float((W - W_hat.float()).norm() / W.norm().clamp_min(1e-30))
