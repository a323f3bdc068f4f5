"""CommVQ (Li et al., ICML 2025): additive vector quantization of the KV cache.

Keys are quantized before RoPE. Each head's key is read as g = D/2 complex numbers (the
pairs that RoPE rotates together, x[j] + i x[j + g] in Hugging Face's rotate_half layout), and
every codeword is a complex number per pair, theta[A] + i theta[B]: a 2x2 block [[x, -y], [y, x]]
that commutes with the rotation, so rotating a decoded key equals decoding with rotated
codewords and attention can run in codebook space. R residual stages, each a pair (A, B) of
log2(L)-bit indices, are fitted greedily with EM on the per-token normalized keys; the M step
is a weighted least-squares solve for theta under that structure.

Values go through a small encoder (LayerNorm, Linear, GELU, Linear) whose hard Gumbel-softmax
picks, for each pair of code bits, one of the four patterns 00, 01, 10, 11; the bits select rows
of an additive codebook (decoding is one matrix product), and one fp16 scale per token restores
the value's norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Distances are built in row chunks of this many (token, head, level, level) elements.
_CHUNK_ELEMENTS = 2**25


def to_pairs(x: Tensor) -> Tensor:
    """Real [..., D] to the complex [..., D/2] pairs that RoPE rotates together."""
    g = x.shape[-1] // 2
    return torch.complex(x[..., :g].float(), x[..., g:].float())


def from_pairs(z: Tensor) -> Tensor:
    return torch.cat([z.real, z.imag], dim=-1)


def key_stages(bits: float, head_dim: int, levels: int) -> int:
    """Residual stages for a bit budget: R = round(bits * g / log2 L). At head dim 128 and
    L = 64 this gives the paper's R = 21 for 2 bits and R = 11 for 1 bit."""
    return max(1, round(bits * (head_dim // 2) / math.log2(levels)))


# ----------------------------------------------------------------------------- keys


@dataclass
class KeyCodebook:
    """theta: complex [H, R, L, g]; the codeword of stage r for codes (A, B) is
    theta[:, r, A] + 1j * theta[:, r, B]."""

    theta: Tensor

    @property
    def heads(self) -> int:
        return self.theta.shape[0]

    @property
    def stages(self) -> int:
        return self.theta.shape[1]

    @property
    def levels(self) -> int:
        return self.theta.shape[2]

    def prefix(self, stages: int) -> KeyCodebook:
        """The first stages: greedy residual training makes this the codebook a shorter
        training would have produced."""
        if stages > self.stages:
            raise ValueError(f"codebook has {self.stages} stages, {stages} asked for")
        return KeyCodebook(self.theta[:, :stages])


def _stage_scores(x: Tensor, theta: Tensor) -> Tensor:
    """|x - c_AB|^2 - |x|^2 for every codeword c_AB = theta_A + i theta_B: [N, H, L, L].

    |x - a - ib|^2 = |x|^2 - 2 Re<x,a> - 2 Re<x,ib> + |a|^2 + |b|^2 + 2 Re<a,ib>, so the
    (A, B) grid costs one [N, L] product per head plus broadcasting, not an [N, L^2, g] one.
    """
    w = torch.einsum("nhj,haj->nha", x.conj(), theta)  # <x, theta_a>
    gram = torch.einsum("haj,hbj->hab", theta.conj(), theta)
    norms = gram.diagonal(dim1=-2, dim2=-1).real
    const = norms[:, :, None] + norms[:, None, :] - 2 * gram.imag  # Re<a, ib> = -Im<a, b>
    d = (-2 * w.real).unsqueeze(-1) + (2 * w.imag).unsqueeze(-2)
    return d.add_(const)


def _rows_per_chunk(heads: int, levels: int) -> int:
    return max(1, _CHUNK_ELEMENTS // (heads * levels * levels))


def nearest_codes(x: Tensor, theta: Tensor) -> Tensor:
    """Exact nearest (A, B) of one stage: int64 [N, H, 2]."""
    levels = theta.shape[1]
    step = _rows_per_chunk(theta.shape[0], levels)
    out = []
    for s in range(0, x.shape[0], step):
        flat = _stage_scores(x[s:s + step], theta).flatten(-2).argmin(-1)
        out.append(torch.stack([flat // levels, flat % levels], dim=-1))
    return torch.cat(out) if out else torch.zeros(0, theta.shape[0], 2, dtype=torch.long)


def stage_codewords(theta: Tensor, codes: Tensor) -> Tensor:
    """theta [H, L, g], codes [N, H, 2] -> complex codewords [N, H, g]."""
    heads = torch.arange(theta.shape[0], device=codes.device)
    return theta[heads, codes[..., 0]] + 1j * theta[heads, codes[..., 1]]


def _m_step(x: Tensor, weights_a: Tensor, weights_b: Tensor, counts: Tensor) -> Tensor:
    """Least-squares theta [H, L, g] for soft or hard assignments.

    Setting the gradient of sum_n sum_AB w_nAB |x_n - theta_A - i theta_B|^2 to zero gives,
    for every pair j at once, (diag(N^A + N^B) + i (N - N^T)) theta = sum_n (w^A_n - i w^B_n) x_n:
    one Hermitian L x L system per head, shared by all pairs.
    """
    n_a, n_b = counts.sum(-1), counts.sum(-2)
    levels = counts.shape[-1]
    eye = torch.eye(levels, dtype=torch.complex128, device=x.device)
    ridge = 1e-9 * (n_a + n_b).mean(-1).clamp_min(1e-12)
    system = (torch.diag_embed((n_a + n_b).to(torch.complex128))
              + 1j * (counts - counts.transpose(-1, -2)).to(torch.complex128)
              + ridge[:, None, None] * eye)
    rhs = (torch.einsum("nha,nhj->haj", weights_a.to(torch.complex128), x.to(torch.complex128))
           - 1j * torch.einsum("nha,nhj->haj", weights_b.to(torch.complex128),
                               x.to(torch.complex128)))
    return torch.linalg.solve(system, rhs).to(torch.complex64)


def _assignments(x: Tensor, theta: Tensor, temperature: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """E step: marginal weights of A and B per token, pair counts, and the hard error."""
    n, heads, _ = x.shape
    levels = theta.shape[1]
    w_a = torch.zeros(n, heads, levels, device=x.device)
    w_b = torch.zeros_like(w_a)
    counts = torch.zeros(heads, levels * levels, device=x.device, dtype=torch.float64)
    err = (x.abs() ** 2).sum().double()
    step = _rows_per_chunk(heads, levels)
    head_offset = torch.arange(heads, device=x.device) * levels * levels
    for s in range(0, n, step):
        d = _stage_scores(x[s:s + step], theta).flatten(-2)
        best, flat = d.min(-1)
        err += best.double().sum()
        if temperature > 0:
            gamma = torch.softmax(d.sub_(best[..., None]).div_(-temperature), dim=-1)
            grid = gamma.view(*gamma.shape[:-1], levels, levels)
            w_a[s:s + step] = grid.sum(-1)
            w_b[s:s + step] = grid.sum(-2)
            counts += gamma.sum(0).double()
        else:
            w_a[s:s + step] = F.one_hot(flat // levels, levels).float()
            w_b[s:s + step] = F.one_hot(flat % levels, levels).float()
            counts.view(-1).index_add_(0, (flat + head_offset).flatten(),
                                       torch.ones(flat.numel(), dtype=torch.float64,
                                                  device=x.device))
    return w_a, w_b, counts.view(heads, levels, levels), err / max(1, n)


def fit_stage(x: Tensor, levels: int, iters: int, temperatures: tuple[float, float],
              generator: torch.Generator) -> tuple[Tensor, list[float]]:
    """EM for one residual stage on x [N, H, g]; returns the best theta [H, L, g] by hard
    error and the hard error (mean squared distance per token) before each M step.

    temperatures (first, last) anneal exponentially, relative to the data's mean |x|^2;
    0 gives hard EM (k-means with the structured codebook), which never raises the error.
    """
    n, heads, g = x.shape
    scale = float((x.abs() ** 2).sum(-1).mean()) or 1.0
    pick = torch.randperm(n, generator=generator)[:levels].to(x.device)
    if pick.numel() < levels:
        pick = pick.repeat(math.ceil(levels / max(1, n)))[:levels]
    theta = (x[pick].permute(1, 0, 2) / math.sqrt(2)).contiguous()
    t0, t1 = temperatures
    history: list[float] = []
    best, best_err = theta, math.inf
    for it in range(iters):
        frac = it / max(1, iters - 1)
        t = t0 * (t1 / t0) ** frac if t0 > 0 and t1 > 0 else 0.0
        w_a, w_b, counts, err = _assignments(x, theta, t * scale)
        history.append(float(err))
        if history[-1] < best_err:
            best, best_err = theta, history[-1]
        theta = _m_step(x, w_a, w_b, counts)
    err = _assignments(x, theta, 0.0)[3]
    history.append(float(err))
    if history[-1] < best_err:
        best = theta
    return best, history


def train_key_codebook(keys: Tensor, stages: int, levels: int, iters: int,
                       temperatures: tuple[float, float], seed: int,
                       on_stage: Callable[[int, list[float]], None] | None = None
                       ) -> tuple[KeyCodebook, list[list[float]]]:
    """Greedy residual EM on pre-RoPE keys [N, H, D]: stage r fits what stages < r left."""
    x = normalize_keys(keys)[0]
    generator = torch.Generator().manual_seed(seed)
    thetas, histories = [], []
    for r in range(stages):
        theta, hist = fit_stage(x, levels, iters, temperatures, generator)
        x = x - stage_codewords(theta, nearest_codes(x, theta))
        thetas.append(theta)
        histories.append(hist)
        if on_stage:
            on_stage(r, hist)
    return KeyCodebook(torch.stack(thetas, dim=1)), histories


def normalize_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Complex pairs [N, H, g] divided by each token's norm over all heads, and that norm
    (fp16, as stored)."""
    norm = keys.float().flatten(1).norm(dim=-1).half()
    safe = norm.float().clamp_min(1e-12)
    return to_pairs(keys) / safe[:, None, None], norm


def encode_keys(keys: Tensor, book: KeyCodebook) -> tuple[Tensor, Tensor]:
    """Pre-RoPE keys [N, H, D] -> codes int64 [N, H, R, 2] and the fp16 token norms [N]."""
    x, norm = normalize_keys(keys)
    codes = []
    for r in range(book.stages):
        c = nearest_codes(x, book.theta[:, r])
        x = x - stage_codewords(book.theta[:, r], c)
        codes.append(c)
    return torch.stack(codes, dim=2), norm


def decode_key_pairs(codes: Tensor, norm: Tensor, book: KeyCodebook) -> Tensor:
    """Codes [N, H, R, 2] and norms [N] -> complex pre-RoPE key pairs [N, H, g]."""
    z = sum(stage_codewords(book.theta[:, r], codes[:, :, r]) for r in range(book.stages))
    return z * norm.float()[:, None, None]


# ----------------------------------------------------------------------------- values

# The four patterns a 4-way hard choice writes into a pair of code bits.
_PATTERNS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def hard_gumbel_softmax(logits: Tensor, tau: float) -> Tensor:
    """One-hot samples of softmax((logits + Gumbel noise) / tau) with the soft sample's
    gradient (straight-through); the noise comes from uniform draws, which the CPU makes far
    faster than torch's exponential sampler."""
    u = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-7)
    soft = torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


class ValueCodec(nn.Module):
    """Encoder and additive codebook for one layer's values (all kv heads together)."""

    def __init__(self, features: int, bits: int, hidden: int | None = None) -> None:
        super().__init__()
        if (features * bits) % 2:
            raise ValueError(f"features x bits must be even, got {features} x {bits}")
        self.features, self.bits = features, bits
        self.rows = features * bits
        pairs = self.rows // 2
        hidden = hidden or min(4096, 4 * pairs)
        self.norm = nn.LayerNorm(features)
        self.enc = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, 4 * pairs)
        self.codebook = nn.Parameter(torch.randn(self.rows, features) / math.sqrt(self.rows))
        self.register_buffer("patterns", _PATTERNS.clone(), persistent=False)

    def logits(self, values: Tensor) -> Tensor:
        unit = values / values.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        h = F.gelu(self.enc(self.norm(unit)))
        return self.out(h).view(*values.shape[:-1], self.rows // 2, 4)

    def code_bits(self, values: Tensor, tau: float | None = None) -> Tensor:
        """Binary codes [..., rows]: hard Gumbel-softmax (straight-through) when tau is given,
        the argmax otherwise."""
        logits = self.logits(values)
        if tau is None:
            choice = F.one_hot(logits.argmax(-1), 4).to(values.dtype)
        else:
            choice = hard_gumbel_softmax(logits, tau)
        return (choice @ self.patterns.to(choice.dtype)).flatten(-2)

    def reconstruct(self, bits: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Decoded values with each token's norm restored, and that fp16 scale."""
        raw = bits @ self.codebook
        scale = (values.norm(dim=-1) / raw.norm(dim=-1).clamp_min(1e-12)).half()
        return raw * scale.to(raw.dtype)[..., None], scale

    def encode(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """Values [N, F] -> binary codes uint8 [N, rows] and fp16 scales [N]."""
        with torch.no_grad():
            bits = self.code_bits(values.float())
            return bits.to(torch.uint8), self.reconstruct(bits, values.float())[1]

    def decode(self, bits: Tensor, scale: Tensor) -> Tensor:
        return (bits.to(self.codebook.dtype) @ self.codebook) * scale.to(
            self.codebook.dtype)[..., None]


def train_value_codecs(values: Sequence[Tensor], bits: int, steps: int, batch: int, lr: float,
                       tau: float, seed: int, hidden: int | None = None,
                       on_step: Callable[[int, float], None] | None = None) -> list[ValueCodec]:
    """Fit every layer's encoder and codebook on its collected values [N, F] by reconstruction
    error of the direction (the stored scale restores the norm exactly). The layers train side
    by side as batched matrix products; each one's loss and gradient are its own."""
    torch.manual_seed(seed)
    codecs = [ValueCodec(v.shape[-1], bits, hidden) for v in values]
    stacked = {
        "norm_w": torch.stack([c.norm.weight for c in codecs]),
        "norm_b": torch.stack([c.norm.bias for c in codecs]),
        "enc_w": torch.stack([c.enc.weight.T for c in codecs]),
        "enc_b": torch.stack([c.enc.bias for c in codecs])[:, None],
        "out_w": torch.stack([c.out.weight.T for c in codecs]),
        "out_b": torch.stack([c.out.bias for c in codecs])[:, None],
        "codebook": torch.stack([c.codebook for c in codecs]),
    }
    params = {k: nn.Parameter(v.detach().clone()) for k, v in stacked.items()}
    opt = torch.optim.Adam(params.values(), lr=lr, fused=True)  # one kernel for all layers
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    data = torch.stack([v.float() for v in values])  # [layers, N, F]
    data = data / data.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gen = torch.Generator().manual_seed(seed)
    features, pairs = data.shape[-1], codecs[0].rows // 2
    for step in range(steps):
        idx = torch.randint(0, data.shape[1], (min(batch, data.shape[1]),), generator=gen)
        x = data[:, idx]
        h = F.layer_norm(x, (features,)) * params["norm_w"][:, None] + params["norm_b"][:, None]
        h = F.gelu(torch.baddbmm(params["enc_b"], h, params["enc_w"]))
        logits = torch.baddbmm(params["out_b"], h, params["out_w"]).view(*x.shape[:2], pairs, 4)
        choice = hard_gumbel_softmax(logits, tau)
        recon = torch.bmm((choice @ _PATTERNS).flatten(-2), params["codebook"])
        unit = recon / recon.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        loss = ((unit - x) ** 2).sum(-1).mean(-1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step:
            on_step(step, float(loss.detach()) / len(codecs))
    with torch.no_grad():
        for i, c in enumerate(codecs):
            c.norm.weight.copy_(params["norm_w"][i])
            c.norm.bias.copy_(params["norm_b"][i])
            c.enc.weight.copy_(params["enc_w"][i].T)
            c.enc.bias.copy_(params["enc_b"][i, 0])
            c.out.weight.copy_(params["out_w"][i].T)
            c.out.bias.copy_(params["out_b"][i, 0])
            c.codebook.copy_(params["codebook"][i])
    return [c.eval() for c in codecs]
