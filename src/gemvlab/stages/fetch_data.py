"""Stage fetch_data: make resources/data/<name>/ (files, splits, manifest)."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gemvlab.stage import StageContext, stage


@stage("fetch_data")
def fetch_data(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    from gemvlab.data.fetch import fetch_dataset

    t0 = time.perf_counter()
    manifest = fetch_dataset(OmegaConf.to_container(cfg.data, resolve=True),
                             Path(cfg.paths.resources))
    metrics: dict[str, float] = {"fetch_s": round(time.perf_counter() - t0, 3),
                                 "files": len(manifest["files"])}
    for split, size in manifest.get("splits", {}).items():
        for key, value in size.items():
            metrics[f"{split}_{key}"] = value
    return metrics


if __name__ == "__main__":
    fetch_data()
