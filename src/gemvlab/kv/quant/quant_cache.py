"""A KV cache whose old tokens are quantized (packed codes) and whose recent ones are not.

Per layer the cache holds packed codes for tokens [0, Q) and full-precision keys and values
for [Q, n). Before query n attends, Q(n) = max(0, floor((n - window) / group) * group) tokens
are quantized: a full-precision window of at least ``window`` tokens, and whole groups of
``group`` tokens (KIVI's 32-token key groups; 1 for CommVQ). When several queries arrive at
once (scoring a text in chunks) each still sees exactly the cache it would see if the tokens
came one by one: tokens that become quantized inside the chunk are attended quantized by the
later queries and in full precision by the earlier ones.

The prompt itself is prefilled in full precision, as KV-cache quantization is deployed; the
cache is then compressed. The model runs with ``use_cache=False`` and explicit position ids
through the registered attention function ``gemvlab_kvq``; ``collecting`` uses the same hook
to gather each layer's keys (un-rotated to before RoPE) and values for codebook training.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from gemvlab.kv.quant.codecs import Codec, Packed, Rotation

NAME = "gemvlab_kvq"
_ACTIVE: contextvars.ContextVar[object | None] = contextvars.ContextVar("gemvlab_kvq",
                                                                        default=None)


def quantized_before(n: int, window: int, group: int) -> int:
    """Tokens held quantized when the query at position n attends."""
    return max(0, (n - window) // group * group)


@dataclass
class QuantLayer:
    """One layer: packed chunks for [0, q), their decoded copy, full precision for [q, n)."""

    packed: list[Packed] = field(default_factory=list)
    dense_k: Tensor | None = None
    dense_v: Tensor | None = None
    tail_k: Tensor | None = None
    tail_v: Tensor | None = None

    @property
    def quantized(self) -> int:
        return sum(p.tokens for p in self.packed)

    @property
    def length(self) -> int:
        return self.quantized + (0 if self.tail_k is None else self.tail_k.shape[0])


def _cat(a: Tensor | None, b: Tensor) -> Tensor:
    return b if a is None else torch.cat([a, b])


class QuantKVCache:
    """The cache of one sequence (batch 1). ``codec`` None keeps everything in full precision.

    The decoded copy of the packed tokens spares decoding the whole prefix at every step; it is
    made from the packed codes when they are written, so attention sees exactly what the codes
    hold, and ``nbytes`` counts only what a deployed cache stores.
    """

    def __init__(self, codec: Codec | None, window: int, layers: int) -> None:
        self.codec, self.window = codec, window
        self.group = codec.group if codec is not None else 1
        self.layers = [QuantLayer() for _ in range(layers)]
        self.full_precision_prefill = False
        self.positions: Tensor | None = None

    def quantized_before(self, n: int) -> int:
        return 0 if self.codec is None else quantized_before(n, self.window, self.group)

    def fork(self, codec: Codec | None) -> QuantKVCache:
        """A copy of a full-precision prefilled cache, compressed with ``codec``."""
        if any(layer.packed for layer in self.layers):
            raise ValueError("fork a full-precision cache (prefilled with codec None)")
        out = QuantKVCache(codec, self.window, len(self.layers))
        out.layers = [QuantLayer(tail_k=layer.tail_k, tail_v=layer.tail_v) for layer in self.layers]
        for i in range(len(out.layers)):
            out.compress_layer(i, out.quantized_before(out.layers[i].length))
        return out

    def roundtrip(self, layer: int, keys: Tensor, values: Tensor, start: int
                  ) -> tuple[Packed, Tensor, Tensor]:
        positions = torch.arange(start, start + keys.shape[0], device=keys.device)
        packed = self.codec.compress(layer, keys, values, positions)
        k, v = self.codec.decompress(layer, packed, keys.dtype)
        return packed, k, v

    def compress_layer(self, i: int, upto: int) -> None:
        """Move tokens [quantized, upto) from full precision into packed codes."""
        layer = self.layers[i]
        start = layer.quantized
        count = upto - start
        if count <= 0:
            return
        packed, k, v = self.roundtrip(i, layer.tail_k[:count], layer.tail_v[:count], start)
        layer.packed.append(packed)
        layer.dense_k, layer.dense_v = _cat(layer.dense_k, k), _cat(layer.dense_v, v)
        layer.tail_k, layer.tail_v = layer.tail_k[count:], layer.tail_v[count:]

    def nbytes(self) -> int:
        """Bytes the cache holds: packed tokens plus full-precision ones at 2 bytes a value."""
        total = 0
        for layer in self.layers:
            total += sum(p.nbytes for p in layer.packed)
            if layer.tail_k is not None:
                total += 2 * (layer.tail_k.numel() + layer.tail_v.numel())
        return total

    def attend(self, i: int, query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
        """Append this forward's tokens, attend with each query's own view, compress."""
        layer = self.layers[i]
        n0, c = layer.length, key.shape[0]
        q_start = layer.quantized
        layer.tail_k, layer.tail_v = _cat(layer.tail_k, key), _cat(layer.tail_v, value)
        if self.full_precision_prefill:
            q_each = torch.full((c,), q_start)
        else:
            q_each = torch.tensor([self.quantized_before(n0 + j) for j in range(c)])
        q_end = int(q_each.max())
        hat_k, hat_v = layer.dense_k, layer.dense_v
        if q_end > q_start:
            _, bk, bv = self.roundtrip(i, layer.tail_k[:q_end - q_start],
                                       layer.tail_v[:q_end - q_start], q_start)
            hat_k, hat_v = _cat(hat_k, bk), _cat(hat_v, bv)
        keys = layer.tail_k if hat_k is None else torch.cat([hat_k, layer.tail_k])
        values = layer.tail_v if hat_v is None else torch.cat([hat_v, layer.tail_v])
        mask, causal = None, n0 == 0 and c > 1 and q_end == 0
        if not causal and (c > 1 or q_end > q_start):
            q_pos = torch.arange(n0, n0 + c)[:, None]
            qn = q_each[:, None]
            hat_ok = torch.arange(q_end)[None, :] < qn
            fp_pos = torch.arange(q_start, n0 + c)[None, :]
            fp_ok = (fp_pos >= qn) & (fp_pos <= q_pos)
            mask = torch.cat([hat_ok, fp_ok], dim=1).to(query.device)
        out = _attention(query, keys, values, mask, causal, scaling)
        if not self.full_precision_prefill:
            self.compress_layer(i, self.quantized_before(n0 + c))
        return out


def _attention(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None,
               causal: bool, scaling: float) -> Tensor:
    """query [Hq, q, D], keys/values [n, H, D] -> [Hq, q, Dv], computed as transformers'
    sdpa path computes it (batched, heads repeated), so full precision matches it exactly."""
    groups = query.shape[0] // keys.shape[1]
    k = keys.transpose(0, 1).repeat_interleave(groups, dim=0)[None]
    v = values.transpose(0, 1).repeat_interleave(groups, dim=0)[None]
    return F.scaled_dot_product_attention(query[None], k, v, attn_mask=mask, is_causal=causal,
                                          scale=scaling)[0]


@dataclass
class Collector:
    """Gathers, per layer, pre-RoPE keys [T, H, D] and values [T, H, Dv] of full forwards."""

    rotation: Rotation
    keys: dict[int, list[Tensor]] = field(default_factory=dict)
    values: dict[int, list[Tensor]] = field(default_factory=dict)
    positions: Tensor | None = None


def _unrotate(keys: Tensor, positions: Tensor, rotation: Rotation) -> Tensor:
    from gemvlab.kv.quant.commvq import from_pairs, to_pairs

    return from_pairs(to_pairs(keys) / rotation(positions)[:, None])


def kvq_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, scaling: float, dropout: float = 0.0,
                  **kwargs) -> tuple[Tensor, None]:
    """transformers' attention signature; the cache or collector comes from ``bound``."""
    state = _ACTIVE.get()
    if state is None:
        raise RuntimeError("gemvlab_kvq attention runs only inside gemvlab.kv.quant.quant_cache")
    if query.shape[0] != 1:
        raise ValueError("the quantized KV cache runs one sequence at a time (batch 1)")
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, H, D]
    if isinstance(state, Collector):
        i = module.layer_idx
        state.keys.setdefault(i, []).append(_unrotate(k, state.positions, state.rotation).cpu())
        state.values.setdefault(i, []).append(v.float().cpu())
        groups = query.shape[1] // key.shape[1]
        out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1,
                                             scale=scaling, enable_gqa=groups > 1)[0]
    else:
        out = state.attend(module.layer_idx, query[0], k, v, scaling)
    return out.unsqueeze(0).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def bound(model: torch.nn.Module, state: QuantKVCache | Collector) -> Iterator[None]:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, kvq_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    token = _ACTIVE.set(state)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        model.set_attn_implementation(previous)


def model_rotation(model: torch.nn.Module) -> Rotation:
    """The factor RoPE multiplies each key pair by at each position, from the model itself
    (its rotary embedding, with any scaling it applies)."""
    from gemvlab.errors import GemvlabError

    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        raise GemvlabError(f"{type(model).__name__} has no single rotary embedding "
                           "(model.model.rotary_emb): the KV codecs need a Llama-family model")
    param = next(model.parameters())

    def rotation(positions: Tensor) -> Tensor:
        probe = torch.zeros(1, dtype=param.dtype, device=positions.device)
        cos, sin = rotary(probe, positions.view(1, -1))
        g = cos.shape[-1] // 2
        return torch.complex(cos[0, :, :g].float(), sin[0, :, :g].float())

    return rotation


def _forward(model: torch.nn.Module, ids: Tensor, start: int, last_only: bool) -> Tensor:
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)
    return model(input_ids=ids, position_ids=positions.unsqueeze(0), use_cache=False,
                 logits_to_keep=1 if last_only else 0).logits


@torch.no_grad()
def collect(model: torch.nn.Module, sequences: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Pre-RoPE keys and values of every layer over the given token sequences (each [1, T])."""
    collector = Collector(model_rotation(model))
    with bound(model, collector):
        for ids in sequences:
            collector.positions = torch.arange(ids.shape[1], device=ids.device)
            _forward(model, ids, 0, last_only=True)
    layers = sorted(collector.keys)
    return ([torch.cat(collector.keys[i]) for i in layers],
            [torch.cat(collector.values[i]) for i in layers])


def num_layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)


@torch.no_grad()
def prefill(model: torch.nn.Module, ids: Tensor, window: int) -> tuple[Tensor, QuantKVCache]:
    """Full-precision prefill of a prompt [1, P]: last logits and the cache to fork."""
    cache = QuantKVCache(None, window, num_layers(model))
    cache.full_precision_prefill = True
    with bound(model, cache):
        logits = _forward(model, ids, 0, last_only=True)
    cache.full_precision_prefill = False
    return logits[:, -1], cache


@torch.no_grad()
def forward_chunk(model: torch.nn.Module, cache: QuantKVCache, ids: Tensor, start: int,
                  last_only: bool = False) -> Tensor:
    """Logits of ids [1, c] at positions start... through the quantized cache."""
    with bound(model, cache):
        return _forward(model, ids, start, last_only)


@torch.no_grad()
def continuation_nll(model: torch.nn.Module, cache: QuantKVCache, ids: Tensor, prefix: int,
                     chunk: int) -> tuple[float, int]:
    """Summed NLL of ids[:, prefix + 1:] given a cache of ids[:, :prefix], fed ``chunk``
    tokens at a time (each query sees the cache it would see token by token); the prefix's
    own full-precision logits score nothing."""
    total = 0.0
    for s in range(prefix, ids.shape[1] - 1, chunk):
        e = min(s + chunk, ids.shape[1] - 1)
        logits = forward_chunk(model, cache, ids[:, s:e], s)[0].float()
        total += -torch.log_softmax(logits, -1).gather(-1, ids[0, s + 1:e + 1, None]).sum().item()
    return total, ids.shape[1] - prefix - 1


@torch.no_grad()
def greedy(model: torch.nn.Module, cache: QuantKVCache, last_logits: Tensor, start: int,
           new_tokens: int, stops: list[int]) -> list[int]:
    """Greedy tokens after a prompt of ``start`` tokens whose last logits are given."""
    out: list[int] = []
    token = int(last_logits[0].argmax())
    for step in range(new_tokens):
        out.append(token)
        if token in stops or step == new_tokens - 1:
            break
        ids = torch.tensor([[token]], device=last_logits.device)
        token = int(forward_chunk(model, cache, ids, start + step, last_only=True)[0, -1].argmax())
    return out
