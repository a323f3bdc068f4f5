"""Stage kv_collect: each layer's keys (before RoPE) and values over Austen text, for
training KV codebooks. Writes resources/kv/<model>/<id>/kv.safetensors (fp16) and a record."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from gemvlab.errors import GemvlabError
from gemvlab.stage import StageContext, stage


def by_scale(node, scale: str):
    """A setting given per scale ({smoke: .., cpu: ..}) or once for all."""
    return node[scale] if isinstance(node, DictConfig) and scale in node else node


def split_sequences(tokenizer, resources: Path, split: str, sequences: int,
                    length: int) -> list[torch.Tensor]:
    """``sequences`` consecutive [1, length] windows of one Austen split's token stream."""
    from gemvlab.eval.perplexity import corpus_ids
    from gemvlab.eval.suite import read_texts

    ids = corpus_ids(tokenizer, read_texts(resources / "data" / "austen" / f"{split}.jsonl"),
                     sequences * length, False)
    if ids.numel() < sequences * length:
        raise GemvlabError(f"the Austen {split} split has {ids.numel()} tokens, fewer than "
                           f"{sequences} x {length}: ask for fewer or shorter sequences")
    return [ids[i * length:(i + 1) * length].view(1, -1) for i in range(sequences)]


@stage("kv_collect")
def kv_collect(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    from gemvlab.eval.suite import load_evaluated_model
    from gemvlab.kv.quant.quant_cache import collect
    from gemvlab.kv.quant.codebooks import KV_FILE, artifact_dirs, save_tensors

    dirs = artifact_dirs(ctx.config)
    if dirs is None:
        raise GemvlabError(f"method={cfg.method.name} trains no codebooks: use method=kvq")
    ccfg, scale = cfg.method.codebooks.collect, str(cfg.scale.name)
    resources = Path(cfg.paths.resources)
    t0 = time.perf_counter()
    model, tokenizer = load_evaluated_model(cfg, resources)
    seqs = split_sequences(tokenizer, resources, str(ccfg.split),
                           int(by_scale(ccfg.sequences, scale)), int(by_scale(ccfg.length, scale)))
    device = next(model.parameters()).device
    keys, values = collect(model, [s.to(device) for s in seqs])
    tensors = {f"k.{i}": k.half() for i, k in enumerate(keys)}
    tensors.update({f"v.{i}": v.half() for i, v in enumerate(values)})
    save_tensors(Path(dirs["collect"]) / KV_FILE, tensors,
                 {"model": cfg.model.name, "tokens": int(keys[0].shape[0]),
                  "layers": len(keys), "split": str(ccfg.split)})
    return {"tokens": int(keys[0].shape[0]), "layers": len(keys),
            "collect_s": round(time.perf_counter() - t0, 3)}


if __name__ == "__main__":
    kv_collect()
