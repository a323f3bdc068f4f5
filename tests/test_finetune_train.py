"""The shared finetuning loop, the 4-bit frozen bases, and the finetune stage end to end."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch import nn

from gemvlab.finetune.adapters import AdapterSpec, add_adapters
from gemvlab.finetune.quantized_base import PackedRTNLinear, decode_packed, quantize_base
from gemvlab.finetune.train import (
    TrainConfig,
    batch_order,
    learning_rate,
    token_windows,
    train,
)
from gemvlab.manifest import write_manifest
from gemvlab.quant.groupwise import rtn_quantize
from tests.conftest import PROSE, run_stage, tiny_overrides
from tests.tiny import make_llama


def test_windows_drop_the_tail_and_batches_cover_every_window_once_per_epoch():
    w = token_windows(torch.arange(23), 5)
    assert w.tolist()[-1] == [15, 16, 17, 18, 19] and w.shape == (4, 5)
    order = batch_order(7, steps=5, batch_size=3, seed=0)  # 15 picks: two epochs and a bit
    flat = order.flatten().tolist()
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    assert torch.equal(order, batch_order(7, 5, 3, seed=0))
    assert not torch.equal(order, batch_order(7, 5, 3, seed=1))
    with pytest.raises(ValueError, match="seq_len=50"):
        token_windows(torch.arange(23), 50)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    cfg = TrainConfig(steps=110, batch_size=1, lr=1e-3, warmup_steps=10)
    lrs = [learning_rate(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert learning_rate(110, cfg) == pytest.approx(1e-4)


# A rotation of a random model's inputs fits one sequence more slowly than a low-rank update.
@pytest.mark.parametrize(("spec", "lr", "drop"),
                         [(AdapterSpec(kind="lora", rank=4), 1e-2, 0.9),
                          (AdapterSpec(kind="oft", block_size=8), 0.1, 0.95)])
def test_training_the_adapters_lowers_the_loss_and_leaves_the_base_alone(spec, lr, drop):
    torch.manual_seed(0)
    model = make_llama(vocab_size=40, seed=1)
    add_adapters(model, spec)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    windows = torch.randint(0, 40, (1, 16)).repeat(4, 1)  # one sequence: learnable
    seen = []
    result = train(model, windows, TrainConfig(steps=30, batch_size=2, lr=lr, seed=0),
                   on_step=lambda s, loss, lr: seen.append(s))
    assert seen == list(range(30)) and not result.diverged
    assert result.losses[-1] < drop * result.losses[0]
    assert len(result.step_s) == 30 and all(t > 0 for t in result.step_s)
    after = dict(model.named_parameters())
    assert frozen and all(torch.equal(after[n], p) for n, p in frozen.items())


def test_a_non_finite_loss_stops_training_as_diverged():
    model = make_llama(vocab_size=40, seed=1)
    add_adapters(model, AdapterSpec(kind="lora", rank=4))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    windows = torch.randint(0, 40, (4, 16))
    result = train(model, windows, TrainConfig(steps=5, batch_size=2, lr=1e-3))
    assert result.diverged and result.losses == []


def test_packed_rtn_base_matches_its_codes_forward_and_backward():
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    layer = PackedRTNLinear(linear, bits=4, group_size=32)
    w_hat = rtn_quantize(linear.weight.detach(), 4, 32).dequantize()
    torch.testing.assert_close(decode_packed(layer.packed, torch.float32), w_hat)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), x_ref @ w_hat.t() + linear.bias
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in layer.parameters())
    stored = sum(t.numel() * t.element_size() for t in layer.packed.planes)
    assert stored == 64 * 24 // 2  # 4 bits per weight


def test_quantize_base_replaces_all_but_skipped_linears():
    model = make_llama(vocab_size=40, seed=1)
    out = quantize_base(model, "rtn4", skip=["lm_head"], group_size=16)
    assert out["base_layers_4bit"] == 14 and out["base_weights_4bit"] == 2 * 9216
    assert isinstance(model.model.layers[1].mlp.down_proj, PackedRTNLinear)
    assert isinstance(model.lm_head, nn.Linear)
    with pytest.raises(ValueError, match="method.base=int3"):
        quantize_base(model, "int3", skip=[])


def test_nf4_base_trains_under_both_adapters():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    torch.manual_seed(0)
    for spec in (AdapterSpec(kind="lora", rank=4, targets=("0",)),
                 AdapterSpec(kind="oft", block_size=16, targets=("0",))):
        model = nn.Sequential(nn.Linear(128, 64))
        quantize_base(model, "nf4", skip=[])
        w_hat = dequantize_4bit(model[0].weight.data, model[0].weight.quant_state)
        x = torch.randn(3, 128)
        torch.testing.assert_close(model(x), x @ w_hat.t() + model[0].bias, rtol=1e-4,
                                   atol=1e-4)
        add_adapters(model, spec)
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():  # move off the identity, so the adapter's gradient is not zero
            params[-1].add_(0.01)
        model(x).pow(2).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.fixture
def ft_tree(tree):
    """The tiny tree with the model fetched and an Austen train split."""
    austen = tree["resources"] / "data" / "austen"
    (austen / "train.jsonl").write_text(
        "".join(json.dumps({"id": f"t{i}", "text": PROSE}) + "\n" for i in range(4)))
    write_manifest(austen, {"name": "austen"}, [austen / "test.jsonl", austen / "train.jsonl"])
    folder = tree["resources"] / "models" / "tiny"
    shutil.copytree(tree["model_src"], folder)
    write_manifest(folder, {"name": "tiny"}, sorted(p for p in folder.iterdir()))
    return tree


def _finetune(tree, *overrides: str) -> dict:
    run = tree["results"] / "_".join(o.replace("=", "-") for o in overrides)
    proc = run_stage("finetune", "experiment=oftv2", *tiny_overrides(tree), "train.seq_len=16",
                     "train.max_tokens=512", *overrides, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((run / "metrics.json").read_text())


def test_finetune_stage_trains_each_method_and_evaluates(ft_tree):
    before = _finetune(ft_tree, "method=fp32")
    assert "steps" not in before and before["ppl_austen"] > 1
    runs = {m: _finetune(ft_tree, f"method={m}", "train.steps=6", "method.lr=1e-2",
                         *([] if m == "lora" else ["method.block_size=8"]))
            for m in ("lora", "oftv2", "oft")}
    # The tiny model's 32 inputs are less than NF4's block of 64: our 4-bit base instead.
    runs["qoft"] = _finetune(ft_tree, "method=qoft", "method.base=rtn4",
                             "method.base_group_size=16", "train.steps=6", "method.lr=1e-2",
                             "method.block_size=8")
    for name, m in runs.items():
        assert m["steps"] == 6 and m["diverged"] == 0, name
        assert m["tokens_trained"] == 6 * 1 * 16  # steps x the experiment's batch x seq_len
        assert m["adapted_layers"] == 14 and m["trainable_params"] > 0
        assert m["train_peak_mem_mb"] > 0 and m["step_ms"] > 0
        assert math.isfinite(m["ppl_austen"]) and math.isfinite(m["loss_final"]), name
    assert runs["lora"]["loss_final"] < runs["lora"]["loss_first"]  # (OFT: see the unit test)
    # OFT and OFTv2: the same parameters, the same data, so the same training up to rounding.
    assert runs["oft"]["trainable_params"] == runs["oftv2"]["trainable_params"]
    # The exact Cayley transform is orthogonal to float32 rounding; 5 Neumann terms are not.
    assert runs["oft"]["orthogonality_error"] < 1e-5 < runs["oftv2"]["orthogonality_error"]
    assert runs["qoft"]["base_layers_4bit"] == 14


def test_finetune_stage_refuses_weight_centric_oft_on_a_4bit_base(ft_tree):
    proc = run_stage("finetune", "experiment=oftv2", *tiny_overrides(ft_tree), "method=qoft",
                     "method.form=weight", "method.block_size=8", "method.base=rtn4",
                     "method.base_group_size=16")
    assert proc.returncode == 1
    assert "form=input" in proc.stderr.strip().splitlines()[-1]
