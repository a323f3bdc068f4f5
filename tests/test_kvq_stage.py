"""The KV-quantization stages' configs: artifact names, clear errors, a checksum on load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemvlab.config import compose, to_plain
from gemvlab.errors import GemvlabError
from gemvlab.kv.quant import commvq
from gemvlab.kv.quant.codebooks import (
    artifact_dirs,
    load_codebooks,
    load_tensors,
    needs_codebooks,
    save_codebooks,
    save_tensors,
)
from gemvlab.kv.quant.runs import build_codecs
from tests.tiny import make_llama


def _plain(*overrides: str) -> dict:
    return to_plain(compose(["experiment=commvq", "scale=smoke", *overrides]))


def test_artifacts_are_named_by_what_changes_them():
    base = artifact_dirs(_plain())
    assert base["collect"].startswith("resources/kv/smollm2-135m/")
    assert base["train"].startswith("resources/codebooks/smollm2-135m/")
    more_iters = artifact_dirs(_plain("method.codebooks.key_codebook.iters.smoke=3"))
    assert more_iters["collect"] == base["collect"] and more_iters["train"] != base["train"]
    longer = artifact_dirs(_plain("method.codebooks.collect.length.smoke=32"))
    assert longer["collect"] != base["collect"] and longer["train"] != base["train"]
    assert artifact_dirs(_plain("scale=cpu"))["collect"] != base["collect"]
    # An evaluation's own knobs do not retrain anything.
    assert artifact_dirs(_plain("eval=kvq_passkey")) == base


def test_only_commvq_settings_need_codebooks():
    assert needs_codebooks(_plain())
    kivi_only = _plain("~method.settings.commvq1", "~method.settings.commvq2")
    assert not needs_codebooks(kivi_only)


def test_unknown_codec_and_missing_codebooks_fail_clearly(tmp_path: Path):
    model = make_llama(50)
    cfg = compose(["experiment=commvq", "scale=smoke", f"paths.resources={tmp_path}",
                   "~method.settings.commvq1", "~method.settings.commvq2",
                   "+method.settings.odd={codec: zip, bits: 2}"])
    with pytest.raises(GemvlabError, match="codec=zip is unknown"):
        build_codecs(cfg, to_plain(cfg), model)
    cfg = compose(["experiment=commvq", "scale=smoke", f"paths.resources={tmp_path}"])
    with pytest.raises(GemvlabError, match="codebooks.safetensors is missing: run python -m "
                                           "gemvlab.stages kv_train"):
        build_codecs(cfg, to_plain(cfg), model)


def test_codebooks_round_trip_and_a_corrupt_file_is_refused(tmp_path: Path):
    keys = torch.randn(64, 2, 8)
    book, _ = commvq.train_key_codebook(keys, 2, 4, 2, (0.0, 0.0), 0)
    codecs = commvq.train_value_codecs([torch.randn(64, 16)], 1, 2, 16, 1e-3, 1.0, 0)
    path = tmp_path / "codebooks.safetensors"
    save_codebooks(path, [book], {1: codecs}, {"levels": 4})
    books, values, meta = load_codebooks(path, "retrain")
    assert torch.equal(books[0].theta, book.theta) and meta["levels"] == 4
    x = torch.randn(5, 16)
    assert torch.equal(values[1][0].encode(x)[0], codecs[0].encode(x)[0])
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(GemvlabError, match="does not match its sha256"):
        load_codebooks(path, "retrain")


def test_collected_kv_is_checked_too(tmp_path: Path):
    path = tmp_path / "kv.safetensors"
    save_tensors(path, {"k.0": torch.ones(2, 2)}, {"layers": 1})
    tensors, meta = load_tensors(path, "recollect")
    assert meta == {"layers": 1} and torch.equal(tensors["k.0"], torch.ones(2, 2))
    path.with_suffix(".sha256").unlink()
    with pytest.raises(GemvlabError, match="is missing: recollect"):
        load_tensors(path, "recollect")
