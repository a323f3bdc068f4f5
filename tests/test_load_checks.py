"""Loading refuses what a manifest cannot catch: weights that do not fit the architecture and
files truncated before their manifest was written; its hints name commands that refetch."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemvlab.config import compose, to_plain
from gemvlab.errors import GemvlabError
from gemvlab.manifest import MANIFEST, is_payload, write_manifest
from gemvlab.models.checkpoint import weight_mismatch
from gemvlab.models.fetch import fetch_model
from gemvlab.models.load import load_model, load_run_model
from tests.conftest import tiny_overrides
from tests.tiny import make_gemma3, make_llama, make_tokenizer

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def fetched(tmp_path: Path, model: torch.nn.Module) -> tuple[dict, Path]:
    """A model=local config and its fetched folder, from a save_pretrained source folder."""
    src = tmp_path / "src"
    model.save_pretrained(src, safe_serialization=True)
    make_tokenizer().save_pretrained(src)
    cfg = {"name": "tiny", "source": "local", "path": str(src), "dtype": "float32"}
    fetch_model(cfg, tmp_path / "resources", online=False)
    return cfg, tmp_path / "resources" / "models" / "tiny"


def llama() -> torch.nn.Module:
    return make_llama(len(make_tokenizer()))


def rewrite_manifest(folder: Path) -> None:
    """A manifest written after the damage, so that its sha256s match the damaged files."""
    write_manifest(folder, {"name": folder.name, "source": "tests"},
                   [p for p in folder.iterdir() if p.is_file() and is_payload(p)])


def edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    rewrite_manifest(folder)


def refuse(cfg: dict, tmp_path: Path) -> str:
    with pytest.raises(GemvlabError) as err:
        load_model(cfg, tmp_path / "resources")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_renamed_tensor_names_the_missing_and_unexpected_key(tmp_path):
    cfg, folder = fetched(tmp_path, llama())
    edit_weights(folder, lambda t: t.update({"model.layers.0.self_attn.query.weight":
                                             t.pop(Q_PROJ)}))
    message = refuse(cfg, tmp_path)
    assert f"1 missing ({Q_PROJ})" in message
    assert "1 unexpected (model.layers.0.self_attn.query.weight)" in message
    assert f"re-save {cfg['path']} with save_pretrained" in message


def test_wrong_shape_is_refused(tmp_path):
    cfg, folder = fetched(tmp_path, llama())
    edit_weights(folder, lambda t: t.update({Q_PROJ: t[Q_PROJ][:, :16].contiguous()}))
    message = refuse(cfg, tmp_path)
    assert f"1 of the wrong shape ({Q_PROJ} [32, 16] in the checkpoint, [32, 32]" in message


@pytest.mark.parametrize("tied", [False, True], ids=["llama", "gemma3-tied"])
def test_intact_checkpoint_loads_every_weight(tmp_path, tied):
    """Gemma ties lm_head to the embeddings (absent from the file) and both have rotary
    inv_freq buffers (never saved): neither is a missing weight."""
    vocab = len(make_tokenizer())
    source = make_gemma3(vocab, ["sliding_attention", "full_attention"]) if tied else \
        make_llama(vocab)
    cfg, folder = fetched(tmp_path, source)
    assert ("lm_head.weight" in load_file(folder / "model.safetensors")) is not tied
    model, tokenizer = load_model(cfg, tmp_path / "resources")
    assert tokenizer is not None
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_truncated_file_with_a_matching_manifest_is_one_line(tmp_path, name):
    cfg, folder = fetched(tmp_path, llama())
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[:len(data) // 2])
    rewrite_manifest(folder)
    message = refuse(cfg, tmp_path)
    assert message.startswith(f"{folder / name} is not ")
    assert "refetch: python -m gemvlab.stages.fetch_model model=local" in message


def refetch_command(message: str, stage: str) -> list[str]:
    """The overrides of the fetch command a hint names."""
    found = re.search(rf"python -m gemvlab\.stages\.{stage} (.+?), or rm -f", message)
    assert found, message
    return shlex.split(found.group(1))


def test_corrupt_model_hint_refetches(tmp_path):
    """The hint's command, composed and fetched as the stage does, repairs the folder; its
    Snakemake route deletes the fetch rule's output."""
    cfg, folder = fetched(tmp_path, llama())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    message = refuse(cfg, tmp_path)
    assert "is corrupt" in message and f"rm -f {folder / MANIFEST} and rerun snakemake" in message
    plain = to_plain(compose(refetch_command(message, "fetch_model")))
    fetch_model(plain["model"], Path(plain["paths"]["resources"]), online=False)
    model, _ = load_model(cfg, tmp_path / "resources")
    assert model.config.model_type == "llama"


def test_corrupt_dataset_hint_refetches(tree):
    austen = tree["resources"] / "data" / "austen"
    (austen / "test.jsonl").write_text("{}\n")
    cfg = compose(tiny_overrides(tree))
    with pytest.raises(GemvlabError) as err:
        load_run_model(cfg, tree["resources"])
    message = str(err.value)
    assert f"rm -f {austen / MANIFEST} and rerun snakemake" in message
    plain = to_plain(compose(refetch_command(message, "fetch_data")))
    assert plain["data"]["name"] == "austen"
    assert Path(plain["paths"]["resources"]) == tree["resources"]


def test_weight_mismatch_counts_and_names_the_first_keys():
    info = {"missing_keys": {f"k{i}" for i in range(5)}, "unexpected_keys": set(),
            "mismatched_keys": set()}
    assert weight_mismatch(info) == "5 missing (k0, k1, k2, and 2 more)"
    assert weight_mismatch({**info, "missing_keys": set()}) is None
