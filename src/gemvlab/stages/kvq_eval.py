"""Stage kvq_eval: every KV-cache quantizer (full precision, KIVI, CommVQ) on one task.

Tasks (``eval.kvq.task``): quality (perplexity of a continuation through the quantized cache,
and the bytes that cache holds), passkey (retrieval of a number hidden at several depths),
mse (reconstruction error of keys and values per layer). Each prompt is prefilled once in full
precision and the cache forked per setting, so all settings see the same prompt pass.

Metrics: ``q/<setting>/<context>/<measure>`` (perplexity) with
``mem/<setting>/<context>/<measure>`` (the bytes the cache holds after the prefix),
``pk/<setting>/<length>/<depth %>/correct`` with ``pk/<setting>/<length>/all/accuracy``
and ``pk/<setting>/all/all/accuracy``, and
``mse/<setting>/<layer>/<key|value>`` with ``mse/<setting>/all/<key|value>`` (layer mean).
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from gemvlab.errors import GemvlabError
from gemvlab.results.provenance import peak_rss_mb
from gemvlab.stage import StageContext, stage
from gemvlab.stages.kv_collect import by_scale, split_sequences

log = logging.getLogger(__name__)

TASKS = ("quality", "passkey", "mse")


def build_codecs(cfg: DictConfig, plain: dict, model) -> dict:
    """Setting name -> codec (None: full precision), in the configured order."""
    from gemvlab.kv.quant import commvq
    from gemvlab.kv.quant.codecs import CommVQCodec, KiviCodec
    from gemvlab.kv.quant.quant_cache import model_rotation
    from gemvlab.kv.quant.codebooks import (
        CODEBOOK_FILE,
        artifact_dirs,
        load_codebooks,
        needs_codebooks,
    )

    if cfg.method.get("kind") != "kvq":
        raise GemvlabError(f"method={cfg.method.name} is not a KV quantizer: use method=kvq")
    books = values = None
    if needs_codebooks(plain):
        books, values, _ = load_codebooks(
            Path(artifact_dirs(plain)["train"]) / CODEBOOK_FILE,
            "run python -m gemvlab.stages.kv_train with the same overrides (or snakemake)")
    head_dim = int(getattr(model.config, "head_dim", None)
                   or model.config.hidden_size // model.config.num_attention_heads)
    codecs = {}
    for name, spec in cfg.method.settings.items():
        kind = spec.get("codec")
        if kind == "none":
            codecs[name] = None
        elif kind == "kivi":
            codecs[name] = KiviCodec(int(spec.bits), int(spec.get("group", 32)))
        elif kind == "commvq":
            bits = int(spec.bits)
            if bits not in values:
                raise GemvlabError(f"method.settings.{name}: no {bits}-bit value codebooks; add "
                                   f"{bits} to method.codebooks.value_codec.bits")
            stages = commvq.key_stages(bits, head_dim, books[0].levels)
            codecs[name] = CommVQCodec(bits, [b.prefix(stages) for b in books], values[bits],
                                       model_rotation(model))
        else:
            raise GemvlabError(f"method.settings.{name}.codec={kind} is unknown: use none, "
                               "kivi or commvq")
    return codecs


def _cache_measures(cache, tokens: int, layers: int, heads: int, dim: int) -> dict[str, float]:
    """Bytes the cache holds, per token and against an fp16 cache of the same tokens."""
    fp16 = 2 * 2 * tokens * layers * heads * dim
    nbytes = cache.nbytes()
    packed = sum(p.nbytes for layer in cache.layers for p in layer.packed)
    quantized = sum(layer.quantized for layer in cache.layers) // layers
    out = {"kv_bytes": nbytes, "kv_bytes_per_token": nbytes / tokens,
           "reduction_vs_fp16": 1 - nbytes / fp16, "quantized_tokens": quantized}
    if quantized:
        out["quantized_bits_per_value"] = 8 * packed / (quantized * layers * 2 * heads * dim)
    return out


def quality_metrics(model, tokenizer, cfg, codecs, scale, resources, bar) -> dict[str, float]:
    from gemvlab.eval.perplexity import corpus_ids
    from gemvlab.eval.suite import read_texts
    from gemvlab.kv.quant.quant_cache import continuation_nll, prefill

    qcfg, window = cfg.eval.kvq, int(cfg.method.window)
    contexts = [int(c) for c in by_scale(qcfg.contexts, scale)]
    scored, chunk = int(by_scale(qcfg.scored, scale)), int(by_scale(qcfg.chunk, scale))
    docs = read_texts(resources / "data" / "austen" / "test.jsonl")
    ids = corpus_ids(tokenizer, docs, max(contexts), False)
    if ids.numel() < max(contexts):
        raise GemvlabError(f"the Austen test split has {ids.numel()} tokens, fewer than "
                           f"{max(contexts)}: lower eval.kvq.contexts")
    device = next(model.parameters()).device
    shape = _kv_shape(model)
    metrics: dict[str, float] = {}
    for context in contexts:
        if not 0 < scored < context:
            raise GemvlabError(f"eval.kvq.scored={scored} must be in (0, context={context})")
        text = ids[:context].view(1, -1).to(device)
        prefix = context - scored
        _, shared = prefill(model, text[:, :prefix], window)
        for name, codec in codecs.items():
            cache = shared.fork(codec)
            measures = _cache_measures(cache, prefix, *shape)
            nll, count = continuation_nll(model, cache, text, prefix, chunk)
            base = f"q/{name}/{context}"
            metrics[f"{base}/ppl"] = math.exp(nll / count)
            metrics[f"{base}/nll"] = nll / count
            metrics[f"{base}/scored_tokens"] = count
            metrics.update({f"mem/{name}/{context}/{k}": v for k, v in measures.items()})
            bar.update()
    return metrics


def _kv_shape(model) -> tuple[int, int, int]:
    """(layers, kv heads, head dim)."""
    c = model.config
    dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    return int(c.num_hidden_layers), int(c.num_key_value_heads), dim


def passkey_metrics(model, tokenizer, cfg, codecs, scale, resources, bar) -> dict[str, float]:
    from gemvlab.eval.passkey import answer_correct, passkey_prompt
    from gemvlab.eval.perplexity import corpus_ids
    from gemvlab.eval.suite import read_texts
    from gemvlab.kv.quant.quant_cache import forward_chunk, greedy, prefill

    pcfg, window = cfg.eval.kvq, int(cfg.method.window)
    lengths = [int(n) for n in by_scale(pcfg.lengths, scale)]
    depths = [float(d) for d in by_scale(pcfg.depths, scale)]
    filler = corpus_ids(tokenizer, read_texts(resources / "data" / "austen" / "test.jsonl"),
                        max(lengths), False).tolist()
    device = next(model.parameters()).device
    rng = random.Random(int(cfg.seed))
    correct: dict[tuple[str, int], list[float]] = {}
    metrics: dict[str, float] = {}
    for length in lengths:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            try:
                prompt = passkey_prompt(tokenizer, filler, length, depth, key)
            except ValueError as exc:
                raise GemvlabError(f"eval.kvq.lengths: {exc}") from None
            hay, question = prompt.haystack.to(device), prompt.question.to(device)
            _, shared = prefill(model, hay, window)
            n = hay.shape[1]
            for name, codec in codecs.items():
                cache = shared.fork(codec)
                last = forward_chunk(model, cache, question, n, last_only=True)[:, -1]
                tokens = greedy(model, cache, last, n + question.shape[1],
                                int(pcfg.new_tokens), stops=[])
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                ok = float(answer_correct(text, key))
                metrics[f"pk/{name}/{length}/{round(depth * 100)}/correct"] = ok
                correct.setdefault((name, length), []).append(ok)
                log.info("passkey %s len %d depth %.2f key %s -> %r", name, length, depth, key,
                         text)
                bar.update()
    for name in codecs:
        every = []
        for length in lengths:
            metrics[f"pk/{name}/{length}/all/accuracy"] = statistics.fmean(
                correct[(name, length)])
            every += correct[(name, length)]
        metrics[f"pk/{name}/all/all/accuracy"] = statistics.fmean(every)
    return metrics


def mse_metrics(model, tokenizer, cfg, codecs, scale, resources, bar) -> dict[str, float]:
    from gemvlab.kv.quant.commvq import from_pairs, to_pairs
    from gemvlab.kv.quant.quant_cache import collect, model_rotation

    mcfg = cfg.eval.kvq
    device = next(model.parameters()).device
    seqs = split_sequences(tokenizer, resources, "test", int(by_scale(mcfg.sequences, scale)),
                           int(by_scale(mcfg.length, scale)))
    rotation = model_rotation(model)
    sums: dict[tuple[str, int, str], list[float]] = {}
    for seq in seqs:
        keys, values = collect(model, [seq.to(device)])
        positions = torch.arange(seq.shape[1], device=device)
        turn = rotation(positions)[:, None]
        for name, codec in codecs.items():
            if codec is None:
                continue
            for i, (k, v) in enumerate(zip(keys, values, strict=True)):
                k_rot = from_pairs(to_pairs(k.to(device)) * turn)
                packed = codec.compress(i, k_rot, v.to(device), positions)
                k_hat, v_hat = codec.decompress(i, packed, torch.float32)
                sums.setdefault((name, i, "key"), []).append(float(((k_hat - k_rot) ** 2).mean()))
                sums.setdefault((name, i, "value"), []).append(
                    float(((v_hat - v.to(device)) ** 2).mean()))
            bar.update()
    metrics = {f"mse/{n}/{i}/{part}": statistics.fmean(vals)
               for (n, i, part), vals in sums.items()}
    for name in {n for n, _, _ in sums}:
        for part in ("key", "value"):
            metrics[f"mse/{name}/all/{part}"] = statistics.fmean(
                v for (n, _, p), v in metrics_items(metrics, name, part))
    return metrics


def metrics_items(metrics: dict[str, float], name: str, part: str):
    """(key parts, value) of one setting's per-layer errors."""
    for key, value in metrics.items():
        _, n, layer, p = key.split("/")
        if n == name and p == part and layer != "all":
            yield (n, layer, p), value


_TASK_FNS = {"quality": quality_metrics, "passkey": passkey_metrics, "mse": mse_metrics}


@stage("kvq_eval")
def kvq_eval(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    from tqdm.auto import tqdm

    from gemvlab.eval.guards import finite_outputs
    from gemvlab.eval.suite import load_evaluated_model

    qcfg = cfg.eval.get("kvq")
    if qcfg is None or qcfg.get("task") not in TASKS:
        raise GemvlabError(f"eval={cfg.eval.name} has no KV-quantization task: use "
                           "eval=kvq_quality, kvq_passkey or kvq_mse")
    scale, resources = str(cfg.scale.name), Path(cfg.paths.resources)
    t0 = time.perf_counter()
    model, tokenizer = load_evaluated_model(cfg, resources)
    codecs = build_codecs(cfg, ctx.config, model)
    metrics: dict[str, float] = {"load_s": round(time.perf_counter() - t0, 3)}
    task = str(qcfg.task)
    bar = tqdm(desc=f"{cfg.model.name} {task}", unit="run")
    with finite_outputs(model, f"model {cfg.model.name}"):
        metrics.update(_TASK_FNS[task](model, tokenizer, cfg, codecs, scale, resources, bar))
    bar.close()
    metrics["eval_s"] = round(time.perf_counter() - t0 - metrics["load_s"], 3)
    metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return metrics


if __name__ == "__main__":
    kvq_eval()
