"""Stage fetch_data: make resources/data/<name>/ (files, splits, manifest)."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gemvlab.stage import StageContext, stage


@stage("fetch_data")
def fetch_data(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    from gemvlab.data import data_dir
    from gemvlab.data.fetch import fetch_dataset
    from gemvlab.manifest import MANIFEST

    t0 = time.perf_counter()
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    manifest = fetch_dataset(data_cfg, Path(cfg.paths.resources))
    fetch_s = round(time.perf_counter() - t0, 3)
    folder = data_dir(Path(cfg.paths.resources), data_cfg["name"])
    ctx.tracker.log_artifact(data_cfg["name"], "dataset-manifest", [folder / MANIFEST],
                             metadata={k: v for k, v in manifest.items() if k != "files"})
    metrics: dict[str, float] = {"fetch_s": fetch_s,
                                 "files": len(manifest["files"])}
    for split, size in manifest.get("splits", {}).items():
        for key, value in size.items():
            metrics[f"{split}_{key}"] = value
    return metrics


if __name__ == "__main__":
    fetch_data()
