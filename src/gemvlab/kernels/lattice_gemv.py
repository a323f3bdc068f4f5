"""Packed low-bit weights and one-token decode GEMV for RTN and GLVQ codes at equal bits.

Why: GLVQ's claim is accuracy at 2-4 bits; whether its decoding (a d x d lattice matvec and an
inverse mu-law per weight) costs decode speed against plain group-wise RTN needs both formats
read from the same packed storage and decoded on every call, never cached.

Packing (exact, b bits per code): a b-bit code is split into bit planes of b's binary digits,
widest first (2 -> [2], 3 -> [2, 1], 4 -> [4]); a plane of width w is an int32 tensor
[N, K*w/32] whose word j holds codes j*32/w .. (j+1)*32/w - 1 of the row, code i of the word at
bits i*w .. i*w + w - 1. A plane never splits a code across words, so every b in 1..8 packs
to exactly N*K*b/8 bytes (K a multiple of 32). GLVQ's signed codes z are stored as z + 2**(b-1).

Decoding of both formats takes the per-(row, group) factors out of the sum: RTN
y = sum_q s_q (sum_k u_k x_k - z_q sum_k x_k), GLVQ y = sum_q s_q/mu_q sum_k f(G_q c)_k x_k, so
each weight costs one code unpack, its decode (GLVQ: lattice matvec, exp) and one multiply-add.
CPU: torch, tiles of rows so the decoded tile stays in cache. CUDA: fused Triton kernels
(``_lattice_triton_jit``), imported on first use so this module imports without triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from gemvlab.quant.glvq import LatticeQuant
from gemvlab.quant.groupwise import GroupQuant

# Triton tiles (rows per program, warps, K steps per loop iteration), per format; a K step
# (BLOCK_K) is the group's largest power-of-2 divisor up to 128. Each the fastest (geometric
# mean over Llama-2-7B's three layer shapes at 2, 3 and 4 bits, g = 128) of nine tiles on an
# H100 (Triton 3.6, 2026-11).
RTN_TILE = (2, 1, 8)
GLVQ_TILE = (16, 2, 1)
# Decoded floats per CPU row tile (1 MiB of float32): the fastest of 2**14..2**20 on 2 shared
# cores (within noise of 2**20) for both formats at SmolLM2's shapes.
CPU_TILE_ELEMS = 2**18


def plane_widths(bits: int) -> tuple[int, ...]:
    """Bit widths of the planes of a ``bits``-bit code: its binary digits, widest first."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return tuple(w for w in (8, 4, 2, 1) if bits & w)


def pack_codes(codes: Tensor, bits: int) -> tuple[Tensor, ...]:
    """Planes (int32 [N, K*w/32] each) of unsigned codes [N, K] in 0..2**bits-1."""
    n, k = codes.shape
    if k % 32:
        raise ValueError(f"K={k} must be a multiple of 32 to pack codes into int32 words")
    u = codes.to(torch.int64)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ValueError(f"codes must lie in 0..{2**bits - 1}")
    planes, low = [], 0
    for w in plane_widths(bits):
        per = 32 // w
        field = ((u >> low) & (2**w - 1)).reshape(n, k // per, per)
        shifts = torch.arange(0, 32, w, dtype=torch.int64, device=u.device)
        word = (field << shifts).sum(-1)
        planes.append(torch.where(word >= 2**31, word - 2**32, word).to(torch.int32))
        low += w
    return tuple(planes)


def unpack_codes(planes: tuple[Tensor, ...], bits: int) -> Tensor:
    """Unsigned codes int32 [N, K] back from ``pack_codes`` planes (exact)."""
    out, low = None, 0
    for plane, w in zip(planes, plane_widths(bits), strict=True):
        shifts = torch.arange(0, 32, w, dtype=torch.int32, device=plane.device)
        field = (plane.unsqueeze(-1) >> shifts).bitwise_and_(2**w - 1).flatten(1)
        out = field if out is None else out.bitwise_or_(field.bitwise_left_shift_(low))
        low += w
    assert out is not None
    return out


@dataclass(frozen=True)
class PackedRTN:
    """RTN codes packed: w = (u - zero) * scale per group; scale fp16 and zero uint8 [N, K/g]."""

    planes: tuple[Tensor, ...]
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.scale.shape[0], self.scale.shape[1] * self.group_size

    @property
    def nbytes(self) -> int:
        return sum(_bytes(t) for t in (*self.planes, self.scale, self.zero))

    def to(self, device: torch.device | str) -> PackedRTN:
        return replace(self, planes=tuple(p.to(device) for p in self.planes),
                       scale=self.scale.to(device), zero=self.zero.to(device))


@dataclass(frozen=True)
class PackedGLVQ:
    """GLVQ codes packed (uniform bits): G fp16 [P, d, d], mu fp16 [Q] or None, scale fp16
    [N, K/g]; decoding as ``LatticeQuant.dequantize``."""

    planes: tuple[Tensor, ...]
    G: Tensor
    mu: Tensor | None
    scale: Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.scale.shape[0], self.scale.shape[1] * self.group_size

    @property
    def nbytes(self) -> int:
        extra = () if self.mu is None else (self.mu,)
        return sum(_bytes(t) for t in (*self.planes, self.G, self.scale, *extra))

    def to(self, device: torch.device | str) -> PackedGLVQ:
        return replace(self, planes=tuple(p.to(device) for p in self.planes),
                       G=self.G.to(device), scale=self.scale.to(device),
                       mu=None if self.mu is None else self.mu.to(device))


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def pack_rtn(q: GroupQuant) -> PackedRTN:
    """RTN/GPTQ codes in packed form; act-order codes (perm) are refused."""
    if q.perm is not None:
        raise ValueError("act-order codes (perm set) need a column permutation: not packed")
    return PackedRTN(pack_codes(q.codes, q.bits), q.scale.half(), q.zero.to(torch.uint8),
                     q.bits, q.group_size)


def pack_glvq(q: LatticeQuant) -> PackedGLVQ:
    """GLVQ codes in packed form; the decode kernels take uniform bit widths only."""
    bits = int(q.bits.min())
    if bits != int(q.bits.max()):
        raise ValueError("the decode GEMV needs one bit width for all groups")
    unsigned = q.codes.to(torch.int64) + 2 ** (bits - 1)
    return PackedGLVQ(pack_codes(unsigned, bits), q.G.half(),
                      None if q.mu is None else q.mu.half(), q.scale.half(), bits, q.group_size)


def _flat(x: Tensor, k: int) -> Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight has {k}")
    return x.reshape(-1, k)


def _row_tiles(n: int, k: int) -> range:
    return range(0, n, max(1, CPU_TILE_ELEMS // k))


def _cpu_rtn(x: Tensor, p: PackedRTN) -> Tensor:
    """y [M, N] float32 = x [M, K] @ W_hat^T, decoding each row tile from the packed codes."""
    n, k = p.shape
    g, groups = p.group_size, k // p.group_size
    xg = x.float().reshape(-1, groups, g).permute(1, 2, 0)  # [groups, g, M]
    xsum = xg.sum(1).unsqueeze(1)                            # [groups, 1, M]
    out = torch.empty(n, x.shape[0])
    step = _row_tiles(n, k).step
    for n0 in _row_tiles(n, k):
        u = unpack_codes(tuple(pl[n0:n0 + step] for pl in p.planes), p.bits)
        rows = u.shape[0]
        c = torch.empty(groups, rows, g).copy_(u.view(rows, groups, g).transpose(0, 1))
        part = torch.bmm(c, xg)                              # [groups, rows, M]
        s = p.scale[n0:n0 + rows].float().T.unsqueeze(-1)
        z = p.zero[n0:n0 + rows].float().T.unsqueeze(-1)
        out[n0:n0 + rows] = ((part - z * xsum) * s).sum(0)
    return out.T


def _cpu_glvq(x: Tensor, p: PackedGLVQ) -> Tensor:
    """y [M, N] float32 = x [M, K] @ W_hat^T: per row tile unpack, lattice matvec by each
    group's G (one batched product), inverse mu-law, then the matvec."""
    n, k = p.shape
    g, groups, d = p.group_size, k // p.group_size, p.G.shape[-1]
    span = 2.0 ** (p.bits - 1)
    mu = None if p.mu is None else p.mu.float().expand(groups).reshape(groups, 1, 1)
    # log1p(mu) folded into G: the clamp to [-1, 1] becomes one to [-L, L], expm1 takes |y|.
    log_mu = torch.ones(groups, 1, 1) if mu is None else torch.log1p(mu)
    g_eff = p.G.float().expand(groups, -1, -1) * (log_mu / span)
    bias = (0.5 - span) * g_eff.sum(-1).unsqueeze(1)       # the code offset, through G
    xg = x.float().reshape(-1, groups, g).permute(1, 2, 0)
    out = torch.empty(n, x.shape[0])
    step = _row_tiles(n, k).step
    for n0 in _row_tiles(n, k):
        u = unpack_codes(tuple(pl[n0:n0 + step] for pl in p.planes), p.bits)
        rows = u.shape[0]
        c = torch.empty(groups, rows, g).copy_(u.view(rows, groups, g).transpose(0, 1))
        y = torch.baddbmm(bias, c.view(groups, -1, d), g_eff.mT)
        if mu is not None:
            y.clamp_(min=-log_mu, max=log_mu)
            y = torch.abs(y).expm1_().copysign_(y)
        part = torch.bmm(y.view(groups, rows, g), xg)      # [groups, rows, M]
        s = p.scale[n0:n0 + rows].float().T.unsqueeze(-1)
        out[n0:n0 + rows] = (part * (s if mu is None else s / mu)).sum(0)
    return out.T


def _block_k(group_size: int, least: int) -> int:
    """The K step: a power of two that divides the group (one group per step), at most 128."""
    block = min(group_size & -group_size, 128)
    if block < least:
        raise ValueError(f"group_size {group_size} needs a power-of-2 divisor >= {least} for "
                         "the Triton kernels")
    return block


def _launch_planes(p: PackedRTN | PackedGLVQ) -> tuple[list[Tensor], dict[str, int]]:
    """Three plane pointers (the first repeated where a code has fewer planes) and widths."""
    planes = [t.contiguous() for t in p.planes]
    widths = plane_widths(p.bits)
    pads = 3 - len(planes)
    return (planes + planes[:1] * pads,
            dict(zip(("W0", "W1", "W2"), (*widths, *(0,) * pads), strict=True)))


def _check_cuda(x: Tensor, p: PackedRTN | PackedGLVQ) -> None:
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the Triton decode GEMV runs on CUDA tensors; on CPU use rtn_gemv or "
                         "glvq_gemv")
    if max(x.numel(), p.shape[0] * p.shape[1], x.shape[0] * p.shape[0]) >= 2**31:
        raise ValueError("the kernels use int32 offsets: fewer than 2**31 elements each")


def rtn_gemv_triton(x: Tensor, p: PackedRTN,
                    tile: tuple[int, int, int] | None = None) -> Tensor:
    """x [M, K] (fp16/bf16/fp32) @ W_hat^T [M, N] in x.dtype: one fused kernel; tile
    (rows per program, warps, unroll) defaults to RTN_TILE."""
    from gemvlab.kernels import _lattice_triton_jit as jit

    _check_cuda(x, p)
    n, k = p.shape
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    planes, widths = _launch_planes(p)
    block_n, warps, unroll = tile or RTN_TILE
    jit.rtn_gemv_kernel[(-(-n // block_n), x.shape[0])](
        x, *planes, p.scale.contiguous(), p.zero.contiguous(), y, n, k, p.group_size,
        **widths, BLOCK_N=block_n, BLOCK_K=_block_k(p.group_size, 32), UNROLL=unroll,
        num_warps=warps)
    return y


def glvq_gemv_triton(x: Tensor, p: PackedGLVQ,
                     tile: tuple[int, int, int] | None = None) -> Tensor:
    """x [M, K] (fp16/bf16/fp32) @ W_hat^T [M, N] in x.dtype: one fused kernel; tile
    (rows per program, warps, unroll) defaults to GLVQ_TILE."""
    from gemvlab.kernels import _lattice_triton_jit as jit

    _check_cuda(x, p)
    n, k = p.shape
    d = p.G.shape[-1]
    dv = max(d, 16)
    if dv % d or d & (d - 1):
        raise ValueError(f"the Triton kernel takes a power-of-2 lattice dimension, got d={d}")
    block_n, warps, unroll = tile or GLVQ_TILE
    block_k = _block_k(p.group_size, max(dv, 32))
    block_n = max(block_n, -(-16 * dv // block_k))  # tl.dot needs >= 16 rows of vectors
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    planes, widths = _launch_planes(p)
    mu = p.G if p.mu is None else p.mu.contiguous()
    span = 2.0 ** (p.bits - 1)
    jit.glvq_gemv_kernel[(-(-n // block_n), x.shape[0])](
        x, *planes, p.G.contiguous(), mu, p.scale.contiguous(), y, n, k, p.group_size,
        0 if p.G.shape[0] == 1 else d * d, 0 if p.mu is None or p.mu.numel() == 1 else 1,
        0.5 - span, 1.0 / span, **widths, D=d, DV=dv, HAS_MU=p.mu is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, UNROLL=unroll, num_warps=warps)
    return y


def rtn_gemv(x: Tensor, p: PackedRTN) -> Tensor:
    """x [..., K] @ W_hat^T for packed RTN codes, in x.dtype: Triton on CUDA, torch on CPU."""
    n, k = p.shape
    x2 = _flat(x, k)
    if x.is_cuda:
        return rtn_gemv_triton(x2, p).reshape(*x.shape[:-1], n)
    return _cpu_rtn(x2, p).to(x.dtype).reshape(*x.shape[:-1], n)


def glvq_gemv(x: Tensor, p: PackedGLVQ) -> Tensor:
    """x [..., K] @ W_hat^T for packed GLVQ codes, in x.dtype: Triton on CUDA, torch on CPU."""
    n, k = p.shape
    x2 = _flat(x, k)
    if x.is_cuda:
        return glvq_gemv_triton(x2, p).reshape(*x.shape[:-1], n)
    return _cpu_glvq(x2, p).to(x.dtype).reshape(*x.shape[:-1], n)


class PackedLinear(nn.Module):
    """A linear layer whose weight stays packed and is decoded inside every forward."""

    def __init__(self, packed: PackedRTN | PackedGLVQ, bias: Tensor | None = None) -> None:
        super().__init__()
        self.packed = packed
        self.gemv = rtn_gemv if isinstance(packed, PackedRTN) else glvq_gemv
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.gemv(x, self.packed)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        n, k = self.packed.shape
        kind = "rtn" if isinstance(self.packed, PackedRTN) else "glvq"
        return f"{kind}, bits={self.packed.bits}, in={k}, out={n}, bytes={self.packed.nbytes}"

