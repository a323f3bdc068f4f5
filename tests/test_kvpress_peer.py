"""The kvpress 0.5.5 peer (python -m gemvlab.kv.evict.peer_kvpress) in its own side folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemvlab.config import REPO_ROOT
from gemvlab.kv.evict.peer_kvpress import compression_ratio
from tests.tiny import make_tokenizer, save_model_folder

KVPRESS = REPO_ROOT / ".whl" / "kvpress"
PROMPTS = {"fox": "The quick brown fox jumps over the lazy dog.",
           "pride": "It is a truth universally acknowledged, that a single man"}


def _run(args: list[str], pythonpath: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-m", "gemvlab.kv.evict.peer_kvpress", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_budget_is_kvpress_compression_ratio_complement() -> None:
    assert compression_ratio(0.5) == 0.5 and compression_ratio(1.0) == 0.0
    with pytest.raises(ValueError):
        compression_ratio(0.0)


def test_without_kvpress_names_the_install_script(tmp_path: Path) -> None:
    """The main venv has no kvpress (or a transformers too new for it): one line, the fix."""
    items = tmp_path / "items.json"
    items.write_text(json.dumps({"max_new_tokens": 1, "presses": [], "items": []}))
    proc = _run(["--model", str(tmp_path), "--input", str(items),
                 "--output", str(tmp_path / "out.json")], pythonpath=None)
    assert proc.returncode != 0
    assert "install_kvpress.sh" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.json").exists()


@pytest.mark.skipif(not (KVPRESS / "kvpress").is_dir(),
                    reason="kvpress 0.5.5 not installed (bash scripts/install_kvpress.sh)")
def test_streaming_llm_and_observed_attention_keep_kvpress_counts(tmp_path: Path) -> None:
    model = save_model_folder(tmp_path / "tiny")
    items = tmp_path / "items.json"
    items.write_text(json.dumps({
        "max_new_tokens": 4, "stop_ids": [],
        "presses": [{"name": "streaming_llm", "budget": 0.5},
                    {"name": "observed_attention", "budget": 0.5}],
        "items": [{"id": k, "prompt": v} for k, v in PROMPTS.items()]}))
    out = tmp_path / "out" / "peer.json"
    proc = _run(["--model", str(model), "--input", str(items), "--output", str(out)],
                pythonpath=str(KVPRESS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["kvpress_version"] == "0.5.5"
    assert result["transformers_version"].startswith("5.2.")
    assert Path(result["transformers_path"]).is_relative_to(KVPRESS)
    assert [p.name for p in out.parent.iterdir()] == ["peer.json"]  # no temp file left
    tokenizer = make_tokenizer()
    records = result["records"]
    assert [(r["press"], r["id"]) for r in records] == [
        (p, k) for p in ("streaming_llm", "observed_attention") for k in PROMPTS]
    for r in records:
        assert "error" not in r, r
        n = len(tokenizer(PROMPTS[r["id"]])["input_ids"])
        assert r["prompt_tokens"] == n and n > 4                  # more than n_sink
        # ScorerPress.compress keeps compute_n_kept(n, ratio) = max(1, int(n * (1 - ratio)))
        assert r["kept_tokens"] == max(1, int(n * (1 - 0.5))) < n
        assert r["kept_tokens_uniform"]
        assert r["budget"] == 0.5 and r["compression_ratio"] == 0.5
        assert r["attn_implementation"] == (
            "eager" if r["press"] == "observed_attention" else "sdpa")
        assert isinstance(r["text"], str) and r["new_tokens"] == len(r["token_ids"]) == 4


@pytest.mark.skipif(not (KVPRESS / "kvpress").is_dir(),
                    reason="kvpress 0.5.5 not installed (bash scripts/install_kvpress.sh)")
def test_our_streaming_generates_what_kvpress_generates(tmp_path: Path) -> None:
    """Our StreamingLLM, compressing the prompt once as kvpress does, keeps as many tokens and
    generates the same ids on the same inputs."""
    import torch

    from gemvlab.kv.evict.generate import generate
    from gemvlab.kv.evict.policies import KVPolicy
    from tests.tiny import make_llama

    folder = tmp_path / "tiny"
    model = make_llama(300, seed=4)
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer().save_pretrained(folder)
    prompts = [torch.randint(0, 250, (23,), generator=torch.Generator().manual_seed(s)).tolist()
               for s in range(3)]
    items = tmp_path / "items.json"
    items.write_text(json.dumps({
        "max_new_tokens": 6, "stop_ids": [], "presses": [{"name": "streaming_llm", "budget": 0.5}],
        "items": [{"id": str(i), "prompt": "", "input_ids": x} for i, x in enumerate(prompts)]}))
    out = tmp_path / "peer.json"
    proc = _run(["--model", str(folder), "--input", str(items), "--output", str(out)],
                pythonpath=str(KVPRESS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["id"]: r for r in json.loads(out.read_text())["records"]}
    ours = KVPolicy("streaming", sinks=4, decode_evicts=False)
    for i, ids in enumerate(prompts):
        mine = generate(model, torch.tensor([ids]), ours, int(23 * 0.5) / 23 - 1e-9, 6)
        assert mine.kept_tokens == records[str(i)]["kept_tokens"] == 11
        assert mine.tokens[0].tolist() == records[str(i)]["token_ids"]
