"""Int8 linear layers: a model's nn.Linear weights stored as int8 codes plus scales.

The schemes are the rows of the LLM.int8() paper's Table 1; a scheme says how activations and
weights are scaled and whether outlier input dims are decomposed out (the threshold).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor, nn

from gemvlab.quant.int8 import QTensor, outlier_columns, quantize, quantized_matmul
from gemvlab.quant.modules import is_skipped, replace_module


@dataclass(frozen=True)
class Int8Scheme:
    """act: 'tensor' or 'token' scales for X; weight: 'tensor' or 'channel' scales for W."""

    act: str
    weight: str
    zeropoint: bool
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.act not in ("tensor", "token") or self.weight not in ("tensor", "channel"):
            raise ValueError(f"int8 scheme needs act in (tensor, token) and weight in "
                             f"(tensor, channel), got act={self.act} weight={self.weight}")


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 codes; every product runs on integers."""

    def __init__(self, linear: nn.Linear, scheme: Int8Scheme) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme = scheme
        w = quantize(linear.weight.detach(), per_row=scheme.weight == "channel",
                     zeropoint=scheme.zeropoint)
        self.register_buffer("q", w.q)
        self.register_buffer("scale", w.scale)
        self.register_buffer("zero", w.zero)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)
        # Input dims decomposed into float, and dims seen, over all calls (for the ablation).
        self.dims_in_float = 0
        self.dims_seen = 0

    @property
    def weight_q(self) -> QTensor:
        return QTensor(self.q, self.scale, self.zero)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.scheme.threshold > 0:
            self.dims_in_float += int(outlier_columns(flat, self.scheme.threshold).sum())
            self.dims_seen += self.in_features
        y = quantized_matmul(flat, self.weight_q, per_row=self.scheme.act == "token",
                             zeropoint=self.scheme.zeropoint, threshold=self.scheme.threshold)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme}"


def quantize_linears(model: nn.Module, scheme: Int8Scheme, skip: Iterable[str] = ()) -> int:
    """Swap every nn.Linear (but those named in skip) for an Int8Linear; returns the count."""
    skip = list(skip)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not is_skipped(name, skip)]
    for name, mod in targets:
        replace_module(model, name, Int8Linear(mod, scheme))
    return len(targets)


def decomposition_share(model: nn.Module) -> float | None:
    """Share of input dims the LLM.int8() layers ran in float; None without decomposition."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear) and m.dims_seen]
    if not layers:
        return None
    return sum(m.dims_in_float for m in layers) / sum(m.dims_seen for m in layers)


def weight_bytes(model: nn.Module, skip: Iterable[str] = ()) -> dict[str, int]:
    """Bytes of the linear weights as stored, and of the whole model with floats in 16 bits.

    The 16-bit view is the paper's comparison (fp16 checkpoint vs int8): integer tensors count
    as stored, every float tensor at 2 bytes per element; tied tensors count once. The linear
    bytes leave out the layers named in skip (a tied output head is the embedding's).
    """
    skip = list(skip)
    linear = linear16 = model16 = 0
    for name, mod in model.named_modules():
        if is_skipped(name, skip):
            continue
        if isinstance(mod, Int8Linear):
            linear += mod.weight_q.nbytes
            linear16 += 2 * mod.q.numel()
        elif isinstance(mod, nn.Linear):
            linear += mod.weight.numel() * mod.weight.element_size()
            linear16 += 2 * mod.weight.numel()
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        size = 2 if tensor.is_floating_point() else tensor.element_size()
        model16 += size * tensor.numel()
    return {"linear_bytes": linear, "linear_bytes_16bit": linear16, "model_bytes_16bit": model16}
