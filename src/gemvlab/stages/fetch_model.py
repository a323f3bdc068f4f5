"""Stage fetch_model: make resources/models/<name>/ (safetensors + tokenizer + manifest)."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gemvlab.stage import StageContext, stage


@stage("fetch_model")
def fetch_model(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    from gemvlab.manifest import MANIFEST
    from gemvlab.models.fetch import fetch_model as fetch
    from gemvlab.models.fetch import model_dir

    t0 = time.perf_counter()
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    manifest = fetch(model_cfg, Path(cfg.paths.resources), online=bool(cfg.hub_online))
    fetch_s = round(time.perf_counter() - t0, 3)
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    folder = model_dir(Path(cfg.paths.resources), model_cfg["name"])
    ctx.tracker.log_artifact(model_cfg["name"], "model-manifest", [folder / MANIFEST],
                             metadata={k: v for k, v in manifest.items() if k != "files"})
    return {"fetch_s": fetch_s, "files": len(manifest["files"]),
            "size_mb": round(total / 2**20, 3)}


if __name__ == "__main__":
    fetch_model()
