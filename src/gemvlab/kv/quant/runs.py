"""Runners of KV-cache quantization. Stage kv_quant_eval: every KV-cache quantizer (full
precision, KIVI, CommVQ) on one task.

Tasks (``eval.kvq.task``): quality (perplexity of a continuation through the quantized cache,
and the bytes that cache holds), passkey (retrieval of a number hidden at several depths),
mse (reconstruction error of keys and values per layer). Each prompt is prefilled once in full
precision and the cache forked per setting, so all settings see the same prompt pass.

Metrics: ``continuation/<setting>/<context>/<measure>`` (perplexity) with
``cache/<setting>/<context>/<measure>`` (the bytes the cache holds after the prefix),
``passkey/<setting>/<length>/<depth %>/correct`` with
``passkey/<setting>/<length>/all/accuracy`` and ``passkey/<setting>/all/all/accuracy``, and
``mse/<setting>/<layer>/<key|value>`` with ``mse/<setting>/all/<key|value>`` (layer mean).

The codebooks are artifacts of two stages of their own, made before the runs that need them:
kv_collect (each layer's keys before RoPE and values over Austen text, fp16 safetensors) and
kv_train (CommVQ's key codebook by greedy residual EM, once at
``method.codebooks.key_codebook.max_bits``, fewer bits using its first stages; one value
encoder and additive codebook per layer and bit width). Stage bench, ``bench.kind: kvq``:
decode attention over a compressed layer, decode-then-attend against codebook space.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from gemvlab.bench.kinds import bench_kind, bench_on_cuda, require_device
from gemvlab.data import data_dir
from gemvlab.errors import GemvlabError
from gemvlab.kv.quant.codebooks import (
    CODEBOOK_FILE,
    KV_FILE,
    artifact_dirs,
    load_codebooks,
    load_tensors,
    needs_codebooks,
    save_codebooks,
    save_tensors,
)
from gemvlab.registry import Artifact, runner
from gemvlab.results.provenance import peak_rss_mb
from gemvlab.stage import StageContext

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TASKS = ("quality", "passkey", "mse")


def split_sequences(tokenizer, resources: Path, split: str, sequences: int,
                    length: int) -> list[torch.Tensor]:
    """``sequences`` consecutive [1, length] windows of one Austen split's token stream."""
    from gemvlab.data import read_texts
    from gemvlab.eval.perplexity import corpus_ids

    ids = corpus_ids(tokenizer, read_texts(data_dir(resources, "austen") / f"{split}.jsonl"),
                     sequences * length, False)
    if ids.numel() < sequences * length:
        raise GemvlabError(f"the Austen {split} split has {ids.numel()} tokens, fewer than "
                           f"{sequences} x {length}: ask for fewer or shorter sequences")
    return [ids[i * length:(i + 1) * length].view(1, -1) for i in range(sequences)]


def build_codecs(cfg: DictConfig, plain: dict, model) -> dict:
    """Setting name -> codec (None: full precision), in the configured order."""
    from gemvlab.kv.quant import commvq
    from gemvlab.kv.quant.codecs import CommVQCodec, KiviCodec
    from gemvlab.kv.quant.quant_cache import model_rotation

    if cfg.method.get("kind") != "kvq":
        raise GemvlabError(f"method={cfg.method.name} is not a KV quantizer: use method=kvq")
    books = values = None
    if needs_codebooks(plain):
        books, values, _ = load_codebooks(
            Path(artifact_dirs(plain)["train"]) / CODEBOOK_FILE,
            "run python -m gemvlab.stages kv_train with the same overrides (or snakemake)")
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


def quality_metrics(model, tokenizer, cfg, codecs, resources, bar) -> dict[str, float]:
    from gemvlab.data import read_texts
    from gemvlab.eval.perplexity import corpus_ids
    from gemvlab.kv.quant.quant_cache import continuation_nll, prefill

    qcfg, window = cfg.eval.kvq, int(cfg.method.window)
    contexts = [int(c) for c in qcfg.contexts]
    scored, chunk = int(qcfg.scored), int(qcfg.chunk)
    docs = read_texts(data_dir(resources, "austen") / "test.jsonl")
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
            base = f"continuation/{name}/{context}"
            metrics[f"{base}/ppl"] = math.exp(nll / count)
            metrics[f"{base}/nll"] = nll / count
            metrics[f"{base}/scored_tokens"] = count
            metrics.update({f"cache/{name}/{context}/{k}": v for k, v in measures.items()})
            bar.update()
    return metrics


def _kv_shape(model) -> tuple[int, int, int]:
    """(layers, kv heads, head dim)."""
    c = model.config
    dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    return int(c.num_hidden_layers), int(c.num_key_value_heads), dim


def passkey_metrics(model, tokenizer, cfg, codecs, resources, bar) -> dict[str, float]:
    from gemvlab.data import read_texts
    from gemvlab.eval.passkey import answer_correct, passkey_prompt
    from gemvlab.eval.perplexity import corpus_ids
    from gemvlab.kv.quant.quant_cache import forward_chunk, greedy, prefill

    pcfg, window = cfg.eval.kvq, int(cfg.method.window)
    lengths = [int(n) for n in pcfg.lengths]
    depths = [float(d) for d in pcfg.depths]
    filler = corpus_ids(tokenizer, read_texts(data_dir(resources, "austen") / "test.jsonl"),
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
                metrics[f"passkey/{name}/{length}/{round(depth * 100)}/correct"] = ok
                correct.setdefault((name, length), []).append(ok)
                log.info("passkey %s len %d depth %.2f key %s -> %r", name, length, depth, key,
                         text)
                bar.update()
    for name in codecs:
        every = []
        for length in lengths:
            metrics[f"passkey/{name}/{length}/all/accuracy"] = statistics.fmean(
                correct[(name, length)])
            every += correct[(name, length)]
        metrics[f"passkey/{name}/all/all/accuracy"] = statistics.fmean(every)
    return metrics


def mse_metrics(model, tokenizer, cfg, codecs, resources, bar) -> dict[str, float]:
    import torch

    from gemvlab.kv.quant.commvq import from_pairs, to_pairs
    from gemvlab.kv.quant.quant_cache import collect, model_rotation

    mcfg = cfg.eval.kvq
    device = next(model.parameters()).device
    seqs = split_sequences(tokenizer, resources, "test", int(mcfg.sequences),
                           int(mcfg.length))
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


def codebook_artifacts(plain) -> list[Artifact]:
    """The trained codebooks a run's CommVQ settings read (none for KIVI and fp16 alone)."""
    if not needs_codebooks(plain):
        return []
    return [Artifact("kv_train", artifact_dirs(plain)["train"], CODEBOOK_FILE, threads=2,
                     mem_mb=12000, runtime_min=60)]


def collected_artifacts(plain) -> list[Artifact]:
    """The keys and values the codebooks train on."""
    return [Artifact("kv_collect", artifact_dirs(plain)["collect"], KV_FILE, threads=2,
                     mem_mb=8000, runtime_min=30)]


@runner("kv_quant_eval", "kv_quantizers", artifacts=codebook_artifacts,
        timed=("load_s", "eval_s", "peak_rss_mb"))
def kv_quant_eval(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    from tqdm.auto import tqdm

    from gemvlab.eval.guards import finite_outputs
    from gemvlab.models.load import load_run_model

    qcfg = cfg.eval.get("kvq")
    if qcfg is None or qcfg.get("task") not in TASKS:
        raise GemvlabError(f"eval={cfg.eval.name} has no KV-quantization task: use "
                           "eval=kvq_quality, kvq_passkey or kvq_mse")
    resources = Path(cfg.paths.resources)
    t0 = time.perf_counter()
    model, tokenizer = load_run_model(cfg, resources)
    codecs = build_codecs(cfg, ctx.config, model)
    metrics: dict[str, float] = {"load_s": round(time.perf_counter() - t0, 3)}
    task = str(qcfg.task)
    bar = tqdm(desc=f"{cfg.model.name} {task}", unit="run")
    with finite_outputs(model, f"model {cfg.model.name}"):
        metrics.update(_TASK_FNS[task](model, tokenizer, cfg, codecs, resources, bar))
    bar.close()
    metrics["eval_s"] = round(time.perf_counter() - t0 - metrics["load_s"], 3)
    metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return metrics


@runner("kv_collect", "kv_codebooks", applies=lambda plain: artifact_dirs(plain) is not None,
        timed=("collect_s",))
def kv_collect(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    """Each layer's keys (before RoPE) and values over Austen text, for training codebooks."""
    from gemvlab.kv.quant.quant_cache import collect
    from gemvlab.models.load import load_run_model

    dirs = artifact_dirs(ctx.config)
    if dirs is None:
        raise GemvlabError(f"method={cfg.method.name} trains no codebooks: use method=kvq")
    ccfg = cfg.method.codebooks.collect
    resources = Path(cfg.paths.resources)
    t0 = time.perf_counter()
    model, tokenizer = load_run_model(cfg, resources)
    seqs = split_sequences(tokenizer, resources, str(ccfg.split),
                           int(ccfg.sequences), int(ccfg.length))
    device = next(model.parameters()).device
    keys, values = collect(model, [s.to(device) for s in seqs])
    tensors = {f"k.{i}": k.half() for i, k in enumerate(keys)}
    tensors.update({f"v.{i}": v.half() for i, v in enumerate(values)})
    save_tensors(Path(dirs["collect"]) / KV_FILE, tensors,
                 {"model": cfg.model.name, "tokens": int(keys[0].shape[0]),
                  "layers": len(keys), "split": str(ccfg.split)})
    return {"tokens": int(keys[0].shape[0]), "layers": len(keys),
            "collect_s": round(time.perf_counter() - t0, 3)}


@runner("kv_train", "kv_codebooks", applies=lambda plain: artifact_dirs(plain) is not None,
        uses_model=False, artifacts=collected_artifacts, needs_gpu=lambda _plain: False,
        timed=("*_train_s",))
def kv_train(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    """CommVQ's key codebooks and value codecs from the collected KV, with training errors."""
    import torch
    from tqdm.auto import tqdm

    from gemvlab.kv.quant import commvq

    dirs = artifact_dirs(ctx.config)
    if dirs is None:
        raise GemvlabError(f"method={cfg.method.name} trains no codebooks: use method=kvq")
    books_cfg = cfg.method.codebooks
    kcfg, vcfg = books_cfg.key_codebook, books_cfg.value_codec
    tensors, meta = load_tensors(Path(dirs["collect"]) / KV_FILE,
                                 "run python -m gemvlab.stages kv_collect with the same "
                                 "overrides (or snakemake)")
    layers = int(meta["layers"])
    keys = [tensors[f"k.{i}"].float() for i in range(layers)]
    values = [tensors[f"v.{i}"].float().flatten(1) for i in range(layers)]
    levels = int(kcfg.levels)
    head_dim = keys[0].shape[-1]
    stages = commvq.key_stages(float(kcfg.max_bits), head_dim, levels)
    metrics: dict[str, float] = {"tokens": keys[0].shape[0], "levels": levels, "stages": stages}
    t0 = time.perf_counter()
    books = []
    temps = tuple(float(t) for t in kcfg.temperatures)
    for i in tqdm(range(layers), desc="key codebooks (EM)", unit="layer"):
        book, histories = commvq.train_key_codebook(
            keys[i], stages, levels, int(kcfg.iters), temps,
            int(books_cfg.seed) + i)
        books.append(book)
        metrics[f"train/key/{i}/first_stage_error_start"] = histories[0][0]
        metrics[f"train/key/{i}/first_stage_error_end"] = histories[0][-1]
        metrics[f"train/key/{i}/last_stage_error_end"] = histories[-1][-1]
    metrics["key_train_s"] = round(time.perf_counter() - t0, 3)
    codecs = {}
    for bits in [int(b) for b in vcfg.bits]:
        t1 = time.perf_counter()
        bar = tqdm(total=int(vcfg.steps), desc=f"value codecs {bits}-bit",
                   unit="step")
        losses: list[float] = []

        def on_step(step: int, loss: float, bar=bar, losses=losses) -> None:
            losses.append(loss)
            bar.update()

        codecs[bits] = commvq.train_value_codecs(
            values, bits, int(vcfg.steps), int(vcfg.batch),
            float(vcfg.lr), float(vcfg.tau), int(books_cfg.seed),
            int(vcfg.hidden) if vcfg.hidden else None, on_step)
        bar.close()
        tail = losses[-max(1, len(losses) // 10):]
        metrics[f"train/value{bits}/loss_start"] = losses[0]
        metrics[f"train/value{bits}/loss_end"] = statistics.fmean(tail)
        metrics[f"value{bits}_train_s"] = round(time.perf_counter() - t1, 3)
    with torch.no_grad():
        for bits, layer_codecs in codecs.items():
            err = [float(((c.decode(*c.encode(v)) - v) ** 2).mean())
                   for c, v in zip(layer_codecs, values, strict=True)]
            metrics[f"train/value{bits}/mse_mean"] = statistics.fmean(err)
    save_codebooks(Path(dirs["train"]) / CODEBOOK_FILE, books, codecs,
                   {"model": cfg.model.name, "levels": levels, "stages": stages,
                    "collected": dirs["collect"]})
    log.info("codebooks for %d layers in %.1f s", layers, time.perf_counter() - t0)
    return metrics


@runner("bench", "kvq", applies=bench_kind("kvq"), uses_model=False, needs_gpu=bench_on_cuda,
        reads=("bench", "method"), timed=("speed/*_ms", "ratio/*/naive_over_commutative"))
def kvq_bench(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    """CommVQ attention over a compressed layer, decode-then-attend against codebook space,
    by context; and each setting's exact bits per cached value at the layer's shape."""
    from tqdm.auto import tqdm

    from gemvlab.kv.quant import commvq
    from gemvlab.kv.quant.commvq_speed import decode_speed
    from gemvlab.models.load import torch_dtype

    bcfg, seed = cfg.bench, int(cfg.seed)
    require_device(bcfg)
    shape = bcfg.shape
    settings = [{"name": name, "levels": int(s.levels), "rows": int(s.bits) * shape.heads
                 * shape.head_dim,
                 "stages": commvq.key_stages(int(s.bits), int(shape.head_dim), int(s.levels))}
                for name, s in bcfg.settings.items()]
    bar = tqdm(total=len(bcfg.contexts) * len(settings), desc=f"{bcfg.name} decode",
               unit="setting")
    metrics = decode_speed([int(c) for c in bcfg.contexts], settings, int(shape.heads),
                           int(shape.q_heads), int(shape.head_dim), int(bcfg.window),
                           float(shape.rope_base), int(bcfg.repeats), int(bcfg.warmup),
                           str(bcfg.device), torch_dtype(bcfg.dtype), seed,
                           on_row=lambda _: bar.update())
    bar.close()
    # Bits per cached value from the packed layer itself (codes, norms, scales; window 0).
    values = 2 * int(shape.heads) * int(shape.head_dim)
    context = max(int(c) for c in bcfg.contexts)
    for setting in settings:
        per_token = metrics.get(f"bytes/{setting['name']}/{context}/kv_bytes_per_token")
        if per_token is not None and int(bcfg.window) == 0:
            metrics[f"memory/{setting['name']}/bits_per_value"] = 8 * per_token / values
            metrics[f"memory/{setting['name']}/reduction_vs_fp16"] = 1 - 8 * per_token / (
                16 * values)
    return metrics
