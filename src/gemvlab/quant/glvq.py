"""GLVQ (Zhang et al. 2025, "Learning Grouped Lattice Vector Quantizers for Low-Bit LLM
Compression", arXiv 2510.20984): each group of input columns gets its own lattice codebook.

Layout follows nn.Linear: W [N, K]. A group is g consecutive input columns over all N rows; each
row's segment of a group is cut into g/d vectors of d consecutive weights. Per group q:

    w = s[n, q] * mu_law_inverse(clamp(G_q c / 2**(b_q - 1), -1, 1), mu_q),   c = z + 1/2

with z the integer codes in code_range(b_q), G_q the learned d x d generation matrix ("unit"
form: the lattice spacing for b bits is G_q / 2**(b-1), so one G serves every bit width), mu_q
the learned mu-law parameter (clipped to [10, 255]) and s the max |w| of the row's segment.
The half offset makes the 2**b levels of each coordinate symmetric about 0 (a coset of the
lattice), so 1-bit groups of salience allocation still encode a sign.

Calibration per layer (``glvq_quantize``), given H = 2/T X^T X of the layer's inputs:
1. bits per group: uniform, or salience-based (the most salient share at b+1 bits and as many of
   the least salient at b-1, so the mean stays b); salience = sum over the group of
   H_jj * W_ij**2, the diagonal estimate of the output error the group can cause;
2. learning: G (Cholesky initialised) and mu trained with Adam on the layer-output loss
   sum_q tr(dW_q H_qq dW_q^T) plus a Frobenius regulariser ||G - G_0||_F^2, codes re-assigned each
   step by Babai rounding (or greedy coordinate descent, the ablation) and held fixed for the
   gradient;
3. encoding: d columns at a time, left to right, with the GPTQ error feedback of each chunk's
   output error into the columns not yet encoded.

Ours, not taken from the paper (only its abstract was readable here): the half offset, the unit
form of G, the salience formula and share, the loss weighting by the diagonal blocks H_qq in
step 2, the error feedback of step 3, and the defaults of steps, lr, regulariser and mu's start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gemvlab.quant.gptq import inverse_hessian_factor
from gemvlab.quant.groupwise import round_up_half
from gemvlab.quant.lattice import (
    cholesky_init,
    clamp_codes,
    clip_mu,
    greedy_coordinate_descent,
    mu_law,
    mu_law_inverse,
)

LATTICES = ("group", "shared")
COMPANDINGS = ("group", "global", "none")
ROUNDINGS = ("babai", "greedy")
# Starting points searched before training: mu, and k as a share of the largest whitened
# coordinate (the whole sample inside the code range at 1.0).
_MU_STARTS = (10.0, 40.0)
_RANGE_SHARES = (0.3, 0.45, 0.65, 1.0)


@dataclass(frozen=True)
class GLVQConfig:
    """Every knob of the method and its ablations (the defaults are the full method)."""

    bits: int = 2
    d: int = 8
    group_size: int = 128
    lattice: str = "group"        # group: one G per group; shared: one G per layer
    companding: str = "group"     # group: one mu per group; global: one per layer; none
    rounding: str = "babai"       # babai, or greedy coordinate descent from the zero code
    salience_share: float = 0.25  # groups at bits+1 (and as many at bits-1); 0: uniform bits
    steps: int = 6
    learn_rows: int = 256         # rows sampled for learning G and mu (all rows are encoded)
    lr: float = 0.01
    frobenius: float = 0.01
    damp: float = 0.01

    def __post_init__(self) -> None:
        for name, value, allowed in (("lattice", self.lattice, LATTICES),
                                     ("companding", self.companding, COMPANDINGS),
                                     ("rounding", self.rounding, ROUNDINGS)):
            if value not in allowed:
                raise ValueError(f"GLVQ {name}={value!r} is unknown: use one of {allowed}")
        if self.group_size % self.d:
            raise ValueError(f"group_size {self.group_size} is not a multiple of the lattice "
                             f"dimension d={self.d}")
        if not 0 <= self.salience_share <= 0.5:
            raise ValueError(f"salience_share must be in [0, 0.5], got {self.salience_share}")
        if self.salience_share and self.bits < 2:
            raise ValueError("salience allocation needs bits >= 2 (groups go down to bits-1)")


@dataclass(frozen=True)
class LatticeQuant:
    """GLVQ codes of W [N, K]; see the module docstring for the decoding formula.

    ``codes`` int8 [N, K]; ``G`` float16 [P, d, d], P = K/g (per group) or 1 (shared);
    ``mu`` float16 [Q], Q = K/g or 1, or None without companding; ``scale`` float16 [N, K/g];
    ``bits`` int64 [K/g].
    """

    codes: Tensor
    G: Tensor
    mu: Tensor | None
    scale: Tensor
    bits: Tensor
    group_size: int

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        groups = k // self.group_size
        if k % self.group_size or self.group_size % self.d:
            raise ValueError(f"K={k}, group_size={self.group_size} and d={self.d} must divide")
        if self.G.shape[0] not in (1, groups) or tuple(self.scale.shape) != (n, groups):
            raise ValueError("G must be [1 or K/g, d, d] and scale [N, K/g]")
        if self.mu is not None and self.mu.shape[0] not in (1, groups):
            raise ValueError("mu must have 1 or K/g entries")
        if tuple(self.bits.shape) != (groups,):
            raise ValueError(f"bits must have K/g={groups} entries")

    @property
    def d(self) -> int:
        return self.G.shape[-1]

    def decode_companded(self) -> Tensor:
        """The lattice points y [N, K] float32 (before companding and scale): one G c each."""
        n, k = self.codes.shape
        groups = k // self.group_size
        c = self.codes.float().add_(0.5).reshape(n, groups, self.group_size // self.d, self.d)
        c = c / (2.0 ** (self.bits.float() - 1)).reshape(1, groups, 1, 1)
        G = self.G.float().expand(groups, -1, -1)
        return torch.einsum("nqvd,qed->nqve", c, G).reshape(n, k)

    def dequantize(self) -> Tensor:
        """W_hat [N, K] float32."""
        n, k = self.codes.shape
        y = self.decode_companded().reshape(n, -1, self.group_size)
        if self.mu is not None:
            y = mu_law_inverse(y.clamp(-1.0, 1.0), self.mu.float().reshape(1, -1, 1))
        return (y * self.scale.float().unsqueeze(-1)).reshape(n, k)

    def bits_per_weight(self) -> float:
        """Stored bits per weight: codes (b_q bits each), one fp16 scale per row and group,
        every G (d*d fp16), every mu (fp16), and 2 bits per group for its width (b-1, b, b+1)
        when widths differ. Not counted: what all layers share (d, g, the base width)."""
        n, k = self.codes.shape
        code_bits = float(self.bits.sum()) * n * self.group_size
        overhead = 16 * self.scale.numel() + 16 * self.G.numel()
        overhead += 0 if self.mu is None else 16 * self.mu.numel()
        overhead += 2 * self.bits.numel() if int(self.bits.min()) != int(self.bits.max()) else 0
        return (code_bits + overhead) / (n * k)


def group_bits(w: Tensor, H: Tensor, cfg: GLVQConfig) -> Tensor:
    """Bits per group [K/g]: salience-ranked b+1 / b / b-1, or b everywhere."""
    groups = w.shape[1] // cfg.group_size
    bits = torch.full((groups,), cfg.bits, dtype=torch.int64)
    moved = int(round(cfg.salience_share * groups))
    if moved == 0:
        return bits
    salience = (w.double() ** 2 * H.diagonal().double()).sum(0).reshape(groups, -1).sum(1)
    order = torch.argsort(salience, descending=True, stable=True)
    bits[order[:moved]] += 1
    bits[order[groups - moved:]] -= 1
    return bits


def _encode(y: Tensor, G_eff: Tensor, bits: Tensor, rounding: str) -> Tensor:
    """Codes z [Q, V, d] of vectors y [Q, V, d] for per-group spacings G_eff [Q, d, d]."""
    x = y - 0.5 * G_eff.sum(-1).unsqueeze(1)  # less G_eff (1/2, ..., 1/2): the coset offset
    if rounding == "babai":
        coords = torch.linalg.solve(G_eff, x.mT).mT
        return clamp_codes(torch.round(coords).to(torch.int64), bits)
    zero = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    # From zero, 2**(b-1) sweeps reach every level of the widest group.
    return greedy_coordinate_descent(x, G_eff, zero, bits, sweeps=2 ** (int(bits.max()) - 1))


def _vectors(w: Tensor, cfg: GLVQConfig) -> Tensor:
    """W [N, K] as per-group vectors [K/g, N * g/d, d]."""
    n, k = w.shape
    groups = k // cfg.group_size
    return (w.reshape(n, groups, cfg.group_size // cfg.d, cfg.d).permute(1, 0, 2, 3)
            .reshape(groups, -1, cfg.d))


def _unvectors(v: Tensor, n: int, cfg: GLVQConfig) -> Tensor:
    groups = v.shape[0]
    return (v.reshape(groups, n, cfg.group_size // cfg.d, cfg.d).permute(1, 0, 2, 3)
            .reshape(n, groups * cfg.group_size))


def row_scales(w: Tensor, group_size: int) -> Tensor:
    """float16 [N, K/g] max |w| per row segment, rounded up so |w| / s <= 1 (and > 0)."""
    n, k = w.shape
    peak = w.abs().reshape(n, k // group_size, group_size).amax(-1).double()
    return round_up_half(peak.clamp(min=2.0**-24))


def learn_lattices(w: Tensor, H: Tensor, bits: Tensor,
                   cfg: GLVQConfig) -> tuple[Tensor, Tensor | None]:
    """Step 2: G [P, d, d] and mu [Q] (or None) trained on the layer-output loss, float32.

    Start: for each candidate mu, G = L k with L the Cholesky factor of the companded vectors'
    moments and k a share of their largest whitened coordinate; the (mu, k) pair of least loss
    is kept, per group (or per layer where G or mu are shared). Then Adam moves
    G = G_start + r P (r the rms entry of G_start, so the step size is relative) and log mu.
    The loss is summed over rows, so a seeded sample of cfg.learn_rows rows estimates it: G
    has d*d entries, and 256 rows of a group give it 256 * g/d vectors to fit.
    """
    if w.shape[0] > cfg.learn_rows:
        rows = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))
        w = w[rows[:cfg.learn_rows].sort().values]
    n, k = w.shape
    groups = k // cfg.group_size
    W = w.float()
    s = row_scales(W, cfg.group_size).float().repeat_interleave(cfg.group_size, 1)
    x = W / s
    g = cfg.group_size
    blocks = torch.stack([H[q * g:(q + 1) * g, q * g:(q + 1) * g] for q in range(groups)]).float()
    spacing = (2.0 ** (bits.float() - 1)).reshape(groups, 1, 1)
    n_mu = {"group": groups, "global": 1, "none": 0}[cfg.companding]

    def per_group(v: Tensor, count: int) -> Tensor:
        return v.repeat_interleave(groups // count, dim=0)

    def group_losses(G: Tensor, mu: Tensor | None, codes: Tensor) -> Tensor:
        y = torch.bmm(codes.float() + 0.5, (per_group(G, G.shape[0]) / spacing).mT)
        y = _unvectors(y, n, cfg).reshape(n, groups, g)
        if mu is not None:
            y = mu_law_inverse(y.clamp(-1.0, 1.0), per_group(mu, n_mu).reshape(1, groups, 1))
        err = (y.reshape(n, k) * s - W).reshape(n, groups, g).transpose(0, 1)
        return (torch.bmm(err, blocks) * err).sum((1, 2))

    def vectors(mu: Tensor | None) -> Tensor:
        if mu is None:
            return _vectors(x, cfg)
        return _vectors(mu_law(x, per_group(mu, n_mu).repeat_interleave(g).reshape(1, k)), cfg)

    def codes_of(G: Tensor, mu: Tensor | None) -> Tensor:
        return _encode(vectors(mu), per_group(G, G.shape[0]) / spacing, bits, cfg.rounding)

    def pick(losses: Tensor, count: int) -> Tensor:
        """Index of the best candidate [count]: per group, or summed over a shared layer."""
        return (losses.argmin(0) if count == groups else
                losses.sum(1, keepdim=True).argmin(0).expand(count))

    with torch.no_grad():
        best_mu, best_G, best_loss = None, None, None
        for mu_c in (_MU_STARTS if n_mu else (None,)):
            mu = None if mu_c is None else torch.full((n_mu,), float(mu_c))
            vec = vectors(mu)
            base = cholesky_init(vec if cfg.lattice == "group" else vec.reshape(1, -1, cfg.d), 1)
            cands = torch.stack([base * f for f in _RANGE_SHARES])
            losses = torch.stack([group_losses(G, mu, codes_of(G, mu)) for G in cands])
            idx = pick(losses, base.shape[0])
            G_c = cands[idx, torch.arange(base.shape[0])]
            loss_c = losses[idx.repeat_interleave(groups // base.shape[0]), torch.arange(groups)]
            if best_loss is None:
                best_mu, best_G, best_loss = mu, G_c, loss_c
                continue
            better = pick(torch.stack([best_loss, loss_c]), base.shape[0]).bool()
            best_G = torch.where(better.reshape(-1, 1, 1), G_c, best_G)
            if mu is not None:
                take = pick(torch.stack([best_loss, loss_c]), n_mu).bool()
                best_mu = torch.where(take, mu, best_mu)
            best_loss = torch.minimum(best_loss, loss_c) if base.shape[0] == groups else (
                loss_c if loss_c.sum() < best_loss.sum() else best_loss)

    G0 = best_G
    rms = G0.pow(2).mean((1, 2), keepdim=True).sqrt()
    P = torch.zeros_like(G0, requires_grad=True)
    log_mu = (best_mu.log() if best_mu is not None else torch.zeros(0)).requires_grad_(True)
    opt = torch.optim.Adam([P] + ([log_mu] if n_mu else []), lr=cfg.lr)
    ref = None
    with torch.enable_grad():  # callers calibrate under no_grad
        for _ in range(cfg.steps):
            G = G0 + rms * P
            mu = clip_mu(log_mu.exp()) if n_mu else None
            with torch.no_grad():
                codes = codes_of(G, mu)
            loss = group_losses(G, mu, codes).sum()
            ref = loss.detach().clamp(min=1e-30) if ref is None else ref
            reg = (P.pow(2).sum((1, 2)) * rms.flatten() ** 2 / G0.pow(2).sum((1, 2))).mean()
            opt.zero_grad()
            (loss / ref + cfg.frobenius * reg).backward()
            opt.step()
    G = (G0 + rms * P).detach()
    return G, (clip_mu(log_mu.detach().exp()) if n_mu else None)


def glvq_quantize(w: Tensor, H: Tensor, cfg: GLVQConfig) -> LatticeQuant:
    """GLVQ codes of W [N, K] given H [K, K] (steps 1-3 of the module docstring).

    Runs on the CPU whatever the inputs' device (a GPU calibration hands CUDA tensors): the
    work is many small per-group operations, and GroupLinear moves decoded weights to the
    activations' device.
    """
    w, H = w.cpu(), H.cpu()
    n, k = w.shape
    if k % cfg.group_size:
        raise ValueError(f"K={k} input columns must split into whole groups of "
                         f"{cfg.group_size}: pick a group_size that divides {k}")
    groups = k // cfg.group_size
    bits = group_bits(w, H, cfg)
    G, mu = learn_lattices(w, H, bits, cfg)
    G16 = G.half()
    mu16 = None if mu is None else mu.half()
    W, U = inverse_hessian_factor(w, H, cfg.damp)
    G_eff = G16.double().expand(groups, -1, -1) / (2.0 ** (bits.double() - 1)).reshape(-1, 1, 1)
    codes = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, groups, dtype=torch.float16)
    d, g = cfg.d, cfg.group_size
    c = d  # columns encoded together: one d-vector per row
    for q in range(groups):
        g0, g1 = q * g, (q + 1) * g
        scales[:, q] = row_scales(W[:, g0:g1], g)[:, 0]
        s = scales[:, q:q + 1].double()
        m = None if mu16 is None else mu16[q % mu16.shape[0]].double()
        err = torch.empty(n, g, dtype=W.dtype)
        for a in range(g0, g1, c):
            x = W[:, a:a + c] / s
            y = x if m is None else mu_law(x.clamp(-1.0, 1.0), m)
            z = _encode(y.reshape(1, -1, d), G_eff[q:q + 1], bits[q:q + 1], cfg.rounding)[0]
            codes[:, a:a + c] = z.reshape(n, c).to(torch.int8)
            y_hat = ((z.double() + 0.5) @ G_eff[q].mT).reshape(n, c)
            if m is not None:
                y_hat = mu_law_inverse(y_hat.clamp(-1.0, 1.0), m)
            e = torch.linalg.solve_triangular(U[a:a + c, a:a + c], W[:, a:a + c] - y_hat * s,
                                              upper=True, left=False)
            W[:, a + c:g1] -= e @ U[a:a + c, a + c:g1]
            err[:, a - g0:a - g0 + c] = e
        W[:, g1:] -= err @ U[g0:g1, g1:]  # the group's feedback to later groups, at once
    return LatticeQuant(codes, G16, mu16, scales, bits, g)

