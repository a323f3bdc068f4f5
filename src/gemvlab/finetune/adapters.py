"""LoRA and OFT adapters wrapped around a model's frozen linear layers.

An adapter only needs its base to map [..., in] -> [..., out], so the same wrappers serve
float, int8 and 4-bit bases. OFT comes in the two forms the OFTv2 paper compares: the original
weight-centric one, which rebuilds the rotated weight R W every step (a matrix-matrix product,
cubic in the width), and OFTv2's input-centric one, which rotates the input block by block
(matrix-vector products) and leaves the base layer, quantized or not, untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gemvlab.finetune.orthogonal import cayley, cayley_neumann, orthogonality_error, skew_symmetric
from gemvlab.quant.modules import replace_module

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterSpec:
    """Which layers get an adapter and its shape; LoRA and OFT fields are read by their kind.

    form: "input" is OFTv2 (rotate the input), "weight" the original OFT (rotate the weight).
    neumann_terms: terms of the Cayley-Neumann series (see orthogonal.cayley_neumann), 0 for
    the exact Cayley transform.
    """

    kind: str
    targets: tuple[str, ...] = LLAMA_TARGETS
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    block_size: int = 32
    form: str = "input"
    neumann_terms: int = 5

    def __post_init__(self) -> None:
        # a config list (or one name) becomes a tuple, so the spec stays hashable
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if self.kind not in ("lora", "oft"):
            raise ValueError(f"unknown adapter kind {self.kind!r}: use 'lora' or 'oft'")
        if not targets:
            raise ValueError("an adapter spec needs at least one target layer name")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.form not in ("input", "weight"):
            raise ValueError(f"unknown OFT form {self.form!r}: use 'input' (OFTv2) or 'weight'")
        if self.block_size < 2:
            raise ValueError(f"OFT block size must be at least 2, got {self.block_size}")
        if self.neumann_terms < 0:
            raise ValueError(f"neumann_terms must be >= 0 (0: exact Cayley), "
                             f"got {self.neumann_terms}")


def _features(base: nn.Module, name: str) -> tuple[int, int]:
    in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if not isinstance(in_f, int) or not isinstance(out_f, int):
        raise ValueError(f"layer {name or type(base).__name__} has no in_features/out_features: "
                         "an adapter wraps linear-like layers only")
    return in_f, out_f


def _device(base: nn.Module) -> torch.device:
    first = next(chain(base.parameters(), base.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def _dense_weight(base: nn.Module) -> Tensor | None:
    """The base's float weight [out, in], or None (4-bit, int8 or code-only bases)."""
    weight = getattr(base, "weight", None)
    shape = (getattr(base, "out_features", None), getattr(base, "in_features", None))
    if isinstance(weight, Tensor) and weight.is_floating_point() and tuple(weight.shape) == shape:
        return weight
    return None


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) B A dropout(x); A kaiming-uniform, B zero, as in peft.

    The adapter's parameters are float32 whatever the base holds: the update is small and
    would drown in bfloat16 rounding.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 name: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features = _features(base, name)
        self.base = base
        self.rank, self.scaling = rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _device(base)
        self.a = nn.Linear(self.in_features, rank, bias=False, device=device)
        self.b = nn.Linear(rank, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.b.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        update = self.b(self.a(self.dropout(x.to(self.a.weight.dtype))))
        return y + (self.scaling * update).to(y.dtype)


class OFTLinear(nn.Module):
    """y = base(x R) with R block-diagonal orthogonal: OFT on a frozen linear-like base.

    Each of the in_features / block_size blocks of R is the Cayley(-Neumann) transform of a
    skew-symmetric Q, held as its upper triangle (zero: R = I, the base unchanged). R acts on
    row vectors, as in peft: for a dense base, x R W^T = x (W R^T)^T, so the weight form's
    rotated weight is W R^T and both forms compute the same function.
    """

    def __init__(self, base: nn.Module, block_size: int, form: str = "input",
                 neumann_terms: int = 5, name: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features = _features(base, name)
        label = name or type(base).__name__
        if self.in_features % block_size:
            raise ValueError(f"layer {label}: OFT block size {block_size} does not divide its "
                             f"in_features {self.in_features}")
        if form not in ("input", "weight"):
            raise ValueError(f"unknown OFT form {form!r}: use 'input' (OFTv2) or 'weight'")
        if form == "weight" and _dense_weight(base) is None:
            raise ValueError(f"layer {label} ({type(base).__name__}) has no dense float weight "
                             "to rotate: use form=input (OFTv2/QOFT)")
        self.base, self.block_size, self.form = base, block_size, form
        self.neumann_terms = neumann_terms
        blocks = self.in_features // block_size
        self.skew = nn.Parameter(torch.zeros(blocks, block_size * (block_size - 1) // 2,
                                             device=_device(base)))

    def rotation(self) -> Tensor:
        """R [blocks, b, b], the blocks of the block-diagonal rotation."""
        q = skew_symmetric(self.skew, self.block_size)
        return cayley(q) if self.neumann_terms == 0 else cayley_neumann(q, self.neumann_terms)

    def forward(self, x: Tensor) -> Tensor:
        r = self.rotation()
        if self.form == "input":
            # The rotation runs in the activations' dtype, as the base layer does: a float32
            # copy of a bfloat16 input, kept for the backward pass, would cost as much memory
            # as the input itself in every adapted layer. R is built in float32 all the same.
            blocks = x.reshape(*x.shape[:-1], r.shape[0], self.block_size)
            rotated = torch.einsum("...rk,rkc->...rc", blocks, r.to(x.dtype))
            return self.base(rotated.reshape(x.shape))
        weight = _dense_weight(self.base)
        dense = torch.block_diag(*r.unbind(0))
        rotated_weight = weight.to(dense.dtype) @ dense.T
        bias = getattr(self.base, "bias", None)
        return F.linear(x, rotated_weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _wrap(base: nn.Module, spec: AdapterSpec, name: str) -> nn.Module:
    if spec.kind == "lora":
        return LoRALinear(base, spec.rank, spec.alpha, spec.dropout, name=name)
    return OFTLinear(base, spec.block_size, spec.form, spec.neumann_terms, name=name)


def _linear_like(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int))


def add_adapters(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Freeze the model and wrap each linear-like layer named in spec.targets (by its last
    name part) in an adapter; returns the wrapped layers' names, in model order."""
    model.requires_grad_(False)
    names = [name for name, module in model.named_modules()
             if name.rpartition(".")[2] in spec.targets and _linear_like(module)]
    if not names:
        raise ValueError(f"no linear layer named {', '.join(spec.targets)} in "
                         f"{type(model).__name__}: check the adapter's targets")
    wrapped = {}  # all built before any is swapped in: an error leaves the model as it was
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear | OFTLinear):
            raise ValueError(f"layer {name} already has an adapter")
        wrapped[name] = _wrap(module, spec, name)
    for name, adapter in wrapped.items():
        replace_module(model, name, adapter)
    return names


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def max_orthogonality_error(model: nn.Module) -> float:
    """The largest ||R^T R - I||_F of the model's OFT layers; 0.0 without any."""
    errors = [orthogonality_error(m.rotation()).item() for m in model.modules()
              if isinstance(m, OFTLinear)]
    return max(errors, default=0.0)
