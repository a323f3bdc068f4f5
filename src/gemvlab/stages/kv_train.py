"""Stage kv_train: CommVQ's codebooks from collected KV. Keys: the RoPE-commutative codebook
by greedy residual EM (once, at method.codebooks.key_codebook.max_bits; fewer bits use its first
stages). Values: one encoder and additive codebook per layer and bit width. Writes
resources/codebooks/<model>/<id>/codebooks.safetensors and a record of the training errors."""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from gemvlab.errors import GemvlabError
from gemvlab.stage import StageContext, stage
from gemvlab.stages.kv_collect import by_scale

log = logging.getLogger(__name__)


@stage("kv_train")
def kv_train(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    from tqdm.auto import tqdm

    from gemvlab.kv.quant import commvq
    from gemvlab.kv.quant.codebooks import (
        CODEBOOK_FILE,
        KV_FILE,
        artifact_dirs,
        load_tensors,
        save_codebooks,
    )

    dirs = artifact_dirs(ctx.config)
    if dirs is None:
        raise GemvlabError(f"method={cfg.method.name} trains no codebooks: use method=kvq")
    books_cfg, scale = cfg.method.codebooks, str(cfg.scale.name)
    kcfg, vcfg = books_cfg.key_codebook, books_cfg.value_codec
    tensors, meta = load_tensors(Path(dirs["collect"]) / KV_FILE,
                                 "run python -m gemvlab.stages.kv_collect with the same "
                                 "overrides (or snakemake)")
    layers = int(meta["layers"])
    keys = [tensors[f"k.{i}"].float() for i in range(layers)]
    values = [tensors[f"v.{i}"].float().flatten(1) for i in range(layers)]
    levels = int(by_scale(kcfg.levels, scale))
    head_dim = keys[0].shape[-1]
    stages = commvq.key_stages(float(kcfg.max_bits), head_dim, levels)
    metrics: dict[str, float] = {"tokens": keys[0].shape[0], "levels": levels, "stages": stages}
    t0 = time.perf_counter()
    books = []
    temps = tuple(float(t) for t in kcfg.temperatures)
    for i in tqdm(range(layers), desc="key codebooks (EM)", unit="layer"):
        book, histories = commvq.train_key_codebook(
            keys[i], stages, levels, int(by_scale(kcfg.iters, scale)), temps,
            int(books_cfg.seed) + i)
        books.append(book)
        metrics[f"train/key/{i}/first_stage_error_start"] = histories[0][0]
        metrics[f"train/key/{i}/first_stage_error_end"] = histories[0][-1]
        metrics[f"train/key/{i}/last_stage_error_end"] = histories[-1][-1]
    metrics["key_train_s"] = round(time.perf_counter() - t0, 3)
    codecs = {}
    for bits in [int(b) for b in vcfg.bits]:
        t1 = time.perf_counter()
        bar = tqdm(total=int(by_scale(vcfg.steps, scale)), desc=f"value codecs {bits}-bit",
                   unit="step")
        losses: list[float] = []

        def on_step(step: int, loss: float, bar=bar, losses=losses) -> None:
            losses.append(loss)
            bar.update()

        codecs[bits] = commvq.train_value_codecs(
            values, bits, int(by_scale(vcfg.steps, scale)), int(by_scale(vcfg.batch, scale)),
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


if __name__ == "__main__":
    kv_train()
