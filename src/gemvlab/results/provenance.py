"""Where and how a run happened: enough to tell two runs' numbers apart, or trust one."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import socket
import subprocess
import sys
from pathlib import Path

from gemvlab.config import REPO_ROOT
from gemvlab.results.source import lock_hash, source_record

_PACKAGES = ("gemvlab", "torch", "transformers", "accelerate", "gguf", "safetensors",
             "hydra-core", "snakemake", "lm-eval", "wandb", "pandas", "numpy", "datasets",
             "bitsandbytes", "triton", "peft")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started or since reset_peak_rss()."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart the peak at the current resident memory (Linux: clear_refs 5), so a stage can
    measure one phase's peak; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def collect(seed: int | None) -> dict:
    import torch

    # Results are outputs, not code: rewriting a committed table does not make a run dirty.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results")
    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
               "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20}
    sha = _git("rev-parse", "HEAD")
    dirty = bool(status) if status is not None else None
    if os.environ.get("GEMVLAB_GIT_SHA"):
        # A copy of the tree sent to another machine (a GPU) whose .git, if any, is not the
        # sender's: the sender names the commit it sent and whether the tree differed from it.
        sha = os.environ["GEMVLAB_GIT_SHA"]
        dirty = {"0": False, "1": True}.get(os.environ.get("GEMVLAB_GIT_DIRTY", ""))
    return {
        "git_sha": sha,
        "git_dirty": dirty,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": package_versions(),
        "cpu": _cpu_model(),
        # The vector instructions torch's kernels use (AVX2, AVX512, ...): they decide how
        # floats are summed, so records of the same config on machines that differ here (or in
        # torch_threads) may differ in their last bits, and chaotic metrics by far more.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "seed": seed,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "source": source_record(),
        "lock_sha256": lock_hash(),
    }
