"""Time one finetuning step (forward, backward, AdamW) of a random-weight causal LM per adapter
implementation: the OFTv2 paper's efficiency question (its Figures 1 and 4a).

Every (model, impl) pair runs in its own Python process (``python -m
gemvlab.finetune.step_bench '<json spec>'``, one JSON row on stdout). That gives each row a clean
peak memory, and lets ``peft015_oft`` import peft 0.15.2 (the weight-centric OFT from before
OFTv2) from its own directory: it cannot live next to the current peft in one interpreter.

Implementations:

- ``lora``, ``oft``, ``oftv2``: gemvlab's adapters (``gemvlab.finetune.adapters``); oft is the
  weight-centric form with the exact Cayley transform, oftv2 the input-centric form with a
  5-term Cayley-Neumann series; block size 32; LoRA rank 16, alpha 32.
- ``peft_lora``, ``peft_oft``: the installed peft's LoRA and OFT (OFT block 32, Cayley-Neumann,
  5 terms), through ``peft.get_peft_model``.
- ``peft015_oft``: peft 0.15.2's OFT at block 32 (exact Cayley), imported from ``peft015_path``.
  Its forward multiplies the float32 rotation by an identity in the input's dtype (a dtype
  error in bf16), so it runs under autocast when the model is not float32. It also learns full
  32 x 32 blocks plus a scale per output feature: more trainable parameters than the others.

All seven linear types of each decoder layer are adapted. A CUDA out-of-memory error gives a row
with ``oom: 1``, not a failure: the paper's own point is that weight-centric OFT runs out of
memory where OFTv2 does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gemvlab.bench.models import paper_shape_lm
from gemvlab.bench.timing import Stopwatch, check_bench_args, spread
from gemvlab.results.provenance import peak_rss_mb

IMPLS = ("lora", "oft", "oftv2", "peft_lora", "peft_oft", "peft015_oft")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK_SIZE = 32
NEUMANN_TERMS = 5
LORA_RANK, LORA_ALPHA = 16, 32.0
LEARNING_RATE = 1e-4
# Text in a failed child's stderr that means the device ran out of memory.
_OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


# ---------------------------------------------------------------- the child: one measurement


def _rss_mb() -> float:
    """Current resident memory of this process (MiB); the peak before any model exists."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def _peft_oft_config(peft: Any) -> Any:
    """OFT at block size 32 on the seven linear types, in whichever peft is imported: 0.15
    has no Cayley-Neumann options (exact Cayley only)."""
    common = dict(r=0, oft_block_size=BLOCK_SIZE, target_modules=list(TARGETS),
                  module_dropout=0.0, init_weights=True)
    if _version_tuple(peft.__version__) < (0, 17):
        return peft.OFTConfig(**common, coft=False, block_share=False)
    return peft.OFTConfig(**common, use_cayley_neumann=True,
                          num_cayley_neumann_terms=NEUMANN_TERMS)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def attach(model: Any, impl: str) -> tuple[Any, str | None]:
    """Freeze the base and add the adapter ``impl`` names; returns (model, peft version)."""
    if impl in ("lora", "oft", "oftv2"):
        from gemvlab.finetune.adapters import AdapterSpec, add_adapters

        spec = {"lora": AdapterSpec(kind="lora", targets=TARGETS, rank=LORA_RANK,
                                    alpha=LORA_ALPHA, dropout=0.0),
                "oft": AdapterSpec(kind="oft", targets=TARGETS, block_size=BLOCK_SIZE,
                                   form="weight", neumann_terms=0),
                "oftv2": AdapterSpec(kind="oft", targets=TARGETS, block_size=BLOCK_SIZE,
                                     form="input", neumann_terms=NEUMANN_TERMS)}[impl]
        add_adapters(model, spec)
        return model, None
    import peft

    if impl == "peft_lora":
        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                 target_modules=list(TARGETS))
    else:
        config = _peft_oft_config(peft)
    return peft.get_peft_model(model, config), str(peft.__version__)


def _step(model: Any, opt: Any, ids: Any, autocast: Any) -> float:
    """One optimiser step on (ids, ids); returns its wall time in ms, device work included."""
    with Stopwatch(ids.device) as watch:
        with autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return watch.seconds * 1e3


def measure_step(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One row: step times, peak memory and trainable parameters of one (model, impl).

    spec keys: name, model_type, shape, impl, batch, seq_len, device, dtype, warmup, repeats,
    seed, threads (optional). Runs in this process; peak memory is this process's, so call it
    in a fresh one (``benchmark_steps`` does).
    """
    import torch

    from gemvlab.models.load import torch_dtype

    dev = torch.device(spec["device"])
    dtype = torch_dtype(spec["dtype"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        base_mb = torch.cuda.memory_allocated(dev) / 2**20
    else:
        base_mb = _rss_mb()
    row: dict[str, Any] = {
        "model": spec["name"], "impl": spec["impl"], "batch": int(spec["batch"]),
        "seq_len": int(spec["seq_len"]), "dtype": str(dtype).removeprefix("torch."),
        "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "base_mem_mb": base_mb, "oom": 0}
    autocast = contextlib.nullcontext
    if spec["impl"] == "peft015_oft" and dtype != torch.float32:
        def autocast() -> Any:
            return torch.autocast(dev.type, dtype=dtype)
    try:
        model = paper_shape_lm(spec["model_type"], spec["shape"], dtype, dev,
                               int(spec["seed"])).train()
        model, row["peft_version"] = attach(model, spec["impl"])
        params = [p for p in model.parameters() if p.requires_grad]
        row["trainable_params"] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=LEARNING_RATE)
        gen = torch.Generator(device=dev).manual_seed(int(spec["seed"]))
        ids = torch.randint(0, model.config.vocab_size, (row["batch"], row["seq_len"]),
                            generator=gen, device=dev)
        times = [_step(model, opt, ids, autocast)
                 for _ in range(int(spec["warmup"]) + int(spec["repeats"]))]
        times = times[int(spec["warmup"]):]
    except torch.OutOfMemoryError as exc:
        row.update(oom=1, reason=str(exc).splitlines()[0][:200])
        times = []
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else peak_rss_mb()
    row["peak_mem_mb"] = peak
    if times:
        row["step_ms"], row["p10_ms"], row["p90_ms"] = spread(times)
    return row


def main(argv: list[str] | None = None) -> None:
    """``python -m gemvlab.finetune.step_bench '<json spec>'``: print one JSON row."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m gemvlab.finetune.step_bench '<json spec>'")
    row = measure_step(json.loads(args[0]))
    print(json.dumps(row), flush=True)


# ---------------------------------------------------------------- the parent: the grid


def _skipped(model: str, impl: str, reason: str) -> dict[str, Any]:
    return {"model": model, "impl": impl, "skipped": 1, "reason": reason}


def _run_child(spec: dict[str, Any], pythonpath: list[str]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; an out-of-memory death becomes an oom row."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "gemvlab.finetune.step_bench", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    last = err[-1] if err else f"exit status {proc.returncode}"
    if proc.returncode == -9 or any(m in proc.stderr for m in _OOM_MARKERS):
        return {"model": spec["name"], "impl": spec["impl"], "oom": 1, "reason": last[:200]}
    raise RuntimeError(f"step bench of {spec['impl']} on {spec['name']} failed: {last}")


def benchmark_steps(models: list[dict], impls: list[str], batch: int, seq_len: int, device: str,
                    dtype: str, warmup: int, repeats: int, seed: int, peft015_path: str | None,
                    *, threads: int | None = None, progress: bool = True) -> list[dict]:
    """One row per (model, impl), each measured in its own process (see the module docstring).

    models: dicts with name, model_type and shape (``AutoConfig.for_model`` keywords). Times in
    ms over ``repeats`` steps after ``warmup``: median (step_ms), p10_ms, p90_ms. peak_mem_mb:
    CUDA max_memory_allocated since before the model was built, or the CPU process's peak RSS
    (base_mem_mb: the same before the model, i.e. torch and the libraries). A row with
    ``skipped: 1`` and a reason was not measured (peft015_oft without its directory).
    """
    check_bench_args(impls, IMPLS, warmup, repeats)
    if batch < 1 or seq_len < 1:
        raise ValueError("batch and seq_len must be >= 1")
    import gemvlab

    here = str(Path(gemvlab.__file__).resolve().parents[1])  # the child imports this gemvlab
    rows: list[dict] = []
    jobs = [(m, impl) for m in models for impl in impls]
    for model, impl in tqdm(jobs, desc="step bench", disable=not progress):
        path = [here]
        if impl == "peft015_oft":
            if not peft015_path or not (Path(peft015_path) / "peft" / "__init__.py").is_file():
                rows.append(_skipped(model["name"], impl, (
                    f"peft 0.15.2 not found in {peft015_path}: run scripts/install_peft015.sh")))
                continue
            path = [str(Path(peft015_path).resolve()), here]
        spec = {"name": str(model["name"]), "model_type": str(model["model_type"]),
                "shape": dict(model["shape"]), "impl": impl, "batch": batch,
                "seq_len": seq_len, "device": device, "dtype": dtype, "warmup": warmup,
                "repeats": repeats, "seed": seed, "threads": threads}
        rows.append(_run_child(spec, path))
    return rows


if __name__ == "__main__":
    main()
