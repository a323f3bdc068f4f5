"""LoRA and OFT adapters: the Cayley(-Neumann) algebra, both OFT forms, and peft as the anchor."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from gemvlab.finetune.adapters import (
    AdapterSpec,
    LoRALinear,
    OFTLinear,
    add_adapters,
    max_orthogonality_error,
    trainable_parameters,
)
from gemvlab.finetune.orthogonal import (
    cayley,
    cayley_neumann,
    orthogonality_error,
    skew_symmetric,
)
from tests.tiny import make_llama

VOCAB = 40
# the tiny Llama's linears per layer, (in, out): hidden 32, 2 heads of 16, 1 kv head, mlp 64
LAYER_SHAPES = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
                "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}


def _random_q(blocks: int, size: int, spectral: float, seed: int = 0,
              dtype: torch.dtype = torch.float64) -> Tensor:
    """Skew-symmetric blocks scaled so the largest spectral norm is ``spectral``."""
    gen = torch.Generator().manual_seed(seed)
    params = torch.randn(blocks, size * (size - 1) // 2, generator=gen, dtype=dtype)
    q = skew_symmetric(params, size)
    return q * spectral / torch.linalg.matrix_norm(q, ord=2).max()


def _ids(seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomize_adapters(model: nn.Module, std: float = 0.05, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


# --- orthogonal.py -------------------------------------------------------------------------

def test_skew_symmetric_puts_params_in_the_upper_triangle():
    params = torch.arange(1.0, 13.0).reshape(2, 6)
    q = skew_symmetric(params, 4)
    assert q.shape == (2, 4, 4)
    assert torch.equal(q, -q.transpose(-2, -1))
    assert q[0, 0, 1] == 1 and q[0, 0, 3] == 3 and q[0, 1, 2] == 4 and q[1, 2, 3] == 12
    assert q[1, 3, 2] == -12
    with pytest.raises(ValueError, match="shape"):
        skew_symmetric(params, 5)


def test_cayley_is_orthogonal_and_is_the_cayley_transform():
    q64 = _random_q(6, 32, spectral=3.0)  # large Q: the exact transform needs no small norm
    r64 = cayley(q64)
    eye = torch.eye(32, dtype=torch.float64)
    assert torch.allclose(r64, (eye + q64) @ torch.linalg.inv(eye - q64), atol=1e-12)
    assert orthogonality_error(r64) < 1e-12
    assert orthogonality_error(cayley(q64.float())) < 1e-5
    # the determinant of a Cayley transform is +1: a rotation, never a reflection
    assert torch.allclose(torch.linalg.det(r64), torch.ones(6, dtype=torch.float64))


def test_cayley_neumann_polynomials():
    q = _random_q(3, 5, spectral=0.7)
    eye = torch.eye(5, dtype=torch.float64)
    assert torch.equal(cayley_neumann(q, 1), eye.expand(3, 5, 5))
    assert torch.allclose(cayley_neumann(q, 2), eye + q)
    expected = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    assert torch.allclose(cayley_neumann(q, 5), expected, atol=1e-14)
    with pytest.raises(ValueError, match="at least 1"):
        cayley_neumann(q, 0)


def test_cayley_neumann_converges_to_cayley_at_the_rate_of_the_truncation():
    # R_n = R (I - Q^(n-1)), so ||R_n - R||_F = ||Q^(n-1)||_F <= s^(n-2) ||Q||_F, s = max ||Q||_2
    q = _random_q(4, 16, spectral=0.6)
    exact = cayley(q)
    s, frob = 0.6, torch.linalg.matrix_norm(q).square().sum().sqrt()
    errors = []
    for terms in range(2, 40):
        err = torch.linalg.matrix_norm(cayley_neumann(q, terms) - exact).square().sum().sqrt()
        power = torch.linalg.matrix_power(q, terms - 1)
        assert torch.isclose(err, torch.linalg.matrix_norm(power).square().sum().sqrt(),
                             rtol=1e-8, atol=1e-15)
        assert err <= s ** (terms - 2) * frob * (1 + 1e-9)
        errors.append(err.item())
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-7


def test_cayley_neumann_orthogonality_error_is_bounded_by_the_truncation():
    # R_n^T R_n - I = -(1 + (-1)^p) Q^p + (-1)^p Q^(2p), p = n - 1, hence
    # ||R_n^T R_n - I||_F <= (2 s^(p-1) + s^(2p-1)) ||Q||_F: order 2p when p is odd, p when even
    q = _random_q(4, 16, spectral=0.5, seed=3)
    s, frob = 0.5, torch.linalg.matrix_norm(q).square().sum().sqrt()
    eye = torch.eye(16, dtype=torch.float64)
    by_terms = {}
    for terms in range(2, 16):
        p = terms - 1
        r = cayley_neumann(q, terms)
        qp = torch.linalg.matrix_power(q, p)
        predicted = -(1 + (-1) ** p) * qp + (-1) ** p * qp @ qp
        assert torch.allclose(r.transpose(-2, -1) @ r - eye, predicted, atol=1e-14)
        err = orthogonality_error(r)
        assert err <= (2 * s ** (p - 1) + s ** (2 * p - 1)) * frob * (1 + 1e-9)
        by_terms[terms] = err.item()
    even = [by_terms[n] for n in range(2, 16, 2)]
    odd = [by_terms[n] for n in range(3, 16, 2)]
    assert all(b < a for a, b in zip(even, even[1:], strict=False))
    assert all(b < a for a, b in zip(odd, odd[1:], strict=False))
    # peft's default of 5 terms is less orthogonal than 4: order Q^4 against Q^6
    assert by_terms[4] < by_terms[5]


# --- adapters.py ---------------------------------------------------------------------------

@pytest.mark.parametrize("terms", [0, 3, 5])
def test_input_and_weight_forms_compute_the_same_function(terms):
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    a = OFTLinear(base, 16, "input", terms)
    b = OFTLinear(base, 16, "weight", terms)
    _randomize_adapters(a, std=0.05)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        ya, yb = a(x), b(x)
        dense = torch.block_diag(*a.rotation().unbind(0))
        ref = base(x @ dense)
    assert (ya - yb).abs().max() < 1e-5
    assert (ya - ref).abs().max() < 1e-5
    assert (ya - base(x)).abs().max() > 1e-2  # the rotation really acts


def test_lora_computes_the_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    lora = LoRALinear(base, rank=4, alpha=12.0)
    assert torch.equal(lora.b.weight, torch.zeros(24, 4))
    assert lora.a.weight.abs().max() <= 32 ** -0.5  # kaiming-uniform, a = sqrt(5)
    _randomize_adapters(lora)
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = base(x) + 3.0 * x @ lora.a.weight.T @ lora.b.weight.T
        assert torch.allclose(lora(x), expected, atol=1e-6)


@pytest.mark.parametrize(("spec", "expected"), [
    # LoRA: rank * (in + out) per linear; per layer 4 * (64+48+48+64+96+96+96) = 2048
    (AdapterSpec("lora", rank=4, alpha=8.0), 2 * 2048),
    # OFT: in / b blocks of b(b-1)/2 = in (b-1)/2 per linear; per layer (6*32 + 64) * 7/2 = 896
    (AdapterSpec("oft", block_size=8), 2 * 896),
    (AdapterSpec("oft", block_size=8, form="weight", neumann_terms=0), 2 * 896),
    # only the attention projections: per layer (32+32+32+32) * 15/2 = 960
    (AdapterSpec("oft", block_size=16, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
     2 * 960),
])
def test_zero_adapters_leave_the_logits_and_count_their_parameters(spec, expected):
    model = make_llama(VOCAB, seed=3)
    ids = _ids()
    ref = _logits(model, ids)
    names = add_adapters(model, spec)
    assert len(names) == 2 * len(spec.targets)
    assert all(name.rpartition(".")[2] in spec.targets for name in names)
    assert trainable_parameters(model) == expected
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if not n.endswith((".skew", ".a.weight", ".b.weight")))
    assert torch.allclose(_logits(model, ids), ref, rtol=0, atol=1e-6)
    assert max_orthogonality_error(model) == 0.0


@pytest.mark.parametrize("spec", [AdapterSpec("lora", rank=4), AdapterSpec("oft", block_size=8),
                                  AdapterSpec("oft", block_size=8, form="weight")])
def test_gradients_reach_the_adapters_only(spec):
    model = make_llama(VOCAB, seed=3)
    add_adapters(model, spec)
    _randomize_adapters(model)  # LoRA's zero B would leave A without a gradient
    out = model(input_ids=_ids(), labels=_ids())
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name
    if spec.kind == "oft":
        with torch.no_grad():
            errors = [orthogonality_error(m.rotation()).item() for m in model.modules()
                      if isinstance(m, OFTLinear)]
        assert len(errors) == 14 and min(errors) > 0
        assert max_orthogonality_error(model) == max(errors)


def test_spec_and_wrapping_errors():
    with pytest.raises(ValueError, match="unknown adapter kind"):
        AdapterSpec("dora")
    with pytest.raises(ValueError, match="unknown OFT form"):
        AdapterSpec("oft", form="output")
    with pytest.raises(ValueError, match="rank"):
        AdapterSpec("lora", rank=0)
    assert AdapterSpec("oft", targets=["q_proj"]).targets == ("q_proj",)
    model = make_llama(VOCAB, seed=3)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj.*does not divide"):
        add_adapters(model, AdapterSpec("oft", block_size=12))
    assert trainable_parameters(model) == 0  # frozen, nothing swapped in
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    with pytest.raises(ValueError, match="qkv, fc1"):
        add_adapters(model, AdapterSpec("lora", targets=("qkv", "fc1")))
    add_adapters(model, AdapterSpec("lora", targets=("q_proj",)))
    with pytest.raises(ValueError, match="already has an adapter"):
        add_adapters(model, AdapterSpec("lora", targets=("q_proj",)))


class CodeLinear(nn.Module):
    """x W^T with W kept only as int8 codes and row scales: a quantized base, no dense weight."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("codes", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantized(self) -> Tensor:
        return self.codes.float() * self.scale

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.dequantized().T


def test_adapters_on_a_quantized_base():
    torch.manual_seed(0)
    quantized = CodeLinear(torch.randn(24, 32))
    dense = nn.Linear(32, 24, bias=False)
    with torch.no_grad():
        dense.weight.copy_(quantized.dequantized())
    x = torch.randn(4, 32)
    oft = OFTLinear(quantized, 8, "input")
    reference = OFTLinear(dense, 8, "weight")
    _randomize_adapters(oft)
    reference.load_state_dict(oft.state_dict(), strict=False)
    assert torch.allclose(oft(x), reference(x), atol=1e-5)
    lora = LoRALinear(quantized, rank=4, alpha=8.0)
    lora_ref = LoRALinear(dense, rank=4, alpha=8.0)
    _randomize_adapters(lora)
    lora_ref.load_state_dict(lora.state_dict(), strict=False)
    assert torch.allclose(lora(x), lora_ref(x), atol=1e-5)
    (oft(x).square().sum() + lora(x).square().sum()).backward()
    assert oft.skew.grad.abs().max() > 0 and lora.a.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="form=input"):
        OFTLinear(quantized, 8, "weight", name="layers.0.q_proj")


# --- peft 0.21.2, the authors' OFT, as the anchor ------------------------------------------

def _peft_pair(config, seed: int = 3):
    """A tiny Llama wrapped by peft with random adapter weights, and the same Llama unwrapped."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_llama(VOCAB, seed=seed), config)
    _randomize_adapters(model)
    return model, make_llama(VOCAB, seed=seed)


def _peft_layers(peft_model, attr: str):
    """(layer name, peft's adapter module) for each peft layer holding ``attr``."""
    for name, module in peft_model.base_model.model.named_modules():
        store = getattr(module, attr, None)
        if isinstance(store, nn.ModuleDict) and "default" in store:
            yield name, store["default"]


@pytest.mark.parametrize("terms", [4, 5, 8])
def test_oft_matches_peft_cayley_neumann(terms):
    peft = pytest.importorskip("peft")
    config = peft.OFTConfig(r=0, oft_block_size=8, target_modules=list(LAYER_SHAPES),
                            use_cayley_neumann=True, num_cayley_neumann_terms=terms)
    theirs, ours = _peft_pair(config)
    add_adapters(ours, AdapterSpec("oft", block_size=8, neumann_terms=terms))
    with torch.no_grad():
        copied = 0
        for name, rotation in _peft_layers(theirs, "oft_R"):
            ours.get_submodule(name).skew.copy_(rotation.weight)  # same [blocks, b(b-1)/2] layout
            copied += 1
    assert copied == 14
    ids = _ids()
    ref = _logits(theirs, ids)
    assert (_logits(ours, ids) - ref).abs().max() < 1e-5
    assert (ref - _logits(make_llama(VOCAB, seed=3), ids)).abs().max() > 1e-3


def test_oft_matches_peft_exact_cayley_with_the_generator_negated():
    # peft's exact branch solves X (I + Q) = I - Q: X = (I - Q)(I + Q)^-1 = cayley(-Q), the
    # transpose of the rotation its Neumann branch approximates; our Q is its -Q
    peft = pytest.importorskip("peft")
    config = peft.OFTConfig(r=0, oft_block_size=8, target_modules=list(LAYER_SHAPES),
                            use_cayley_neumann=False)
    theirs, ours = _peft_pair(config)
    add_adapters(ours, AdapterSpec("oft", block_size=8, neumann_terms=0))
    ids = _ids()
    ref = _logits(theirs, ids)
    layers = list(_peft_layers(theirs, "oft_R"))
    with torch.no_grad():
        for name, rotation in layers:
            ours.get_submodule(name).skew.copy_(rotation.weight)
    assert (_logits(ours, ids) - ref).abs().max() > 1e-3  # the sign matters
    with torch.no_grad():
        for name, rotation in layers:
            ours.get_submodule(name).skew.copy_(-rotation.weight)
    assert (_logits(ours, ids) - ref).abs().max() < 1e-5


def test_lora_matches_peft():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(LAYER_SHAPES))
    theirs, ours = _peft_pair(config)
    add_adapters(ours, AdapterSpec("lora", rank=4, alpha=8.0))
    assert trainable_parameters(ours) == trainable_parameters(theirs)
    with torch.no_grad():
        for name, a in _peft_layers(theirs, "lora_A"):
            ours.get_submodule(name).a.weight.copy_(a.weight)
        for name, b in _peft_layers(theirs, "lora_B"):
            ours.get_submodule(name).b.weight.copy_(b.weight)
    ids = _ids()
    assert (_logits(ours, ids) - _logits(theirs, ids)).abs().max() < 1e-5


def test_input_form_on_a_bfloat16_base_rotates_in_bfloat16_and_trains_float32_params():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 16).to(torch.bfloat16).requires_grad_(False)
    layer = OFTLinear(base, block_size=16)
    with torch.no_grad():
        layer.skew.normal_(std=0.05)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.skew.dtype == torch.float32
    want = x.float() @ torch.block_diag(*layer.rotation().detach()) @ base.weight.float().t()
    torch.testing.assert_close(y.float(), want + base.bias.float(), rtol=0.03, atol=0.03)
    y.float().pow(2).sum().backward()
    assert layer.skew.grad is not None and layer.skew.grad.dtype == torch.float32
    assert layer.skew.grad.abs().sum() > 0
