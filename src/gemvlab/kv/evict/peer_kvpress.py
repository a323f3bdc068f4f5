"""Peer runs through NVIDIA kvpress 0.5.5, for the Keyformer comparison (run as a subprocess).

kvpress pins transformers<5.3, so it lives in .whl/kvpress (``bash scripts/install_kvpress.sh``)
and only this process sees it::

    PYTHONPATH=.whl/kvpress .venv/bin/python -m gemvlab.kv.evict.peer_kvpress \\
        --model <folder> --input items.json --output out.json

items.json: ``{"max_new_tokens": int, "presses": [{"name": "streaming_llm" | "observed_attention"
| "snapkv" | "knorm", "budget": 0.5, ...}], "items": [{"id": str, "prompt": str}]}``. Optional:
an item's ``input_ids`` (used as given instead of tokenizing ``prompt``), a press's
``attn_implementation`` and any other key of a press entry, passed to the press's constructor
(e.g. ``window_size`` for snapkv); top level ``stop_ids`` (default: the model's eos ids; ``[]``
generates exactly max_new_tokens) and ``add_special_tokens`` (default true).

For each press and item the prompt is prefilled with the press's hooks on (kvpress prunes each
layer's cache right after that layer's prefill attention, keeping ``int(n * budget)`` of the n
prompt tokens; its compression_ratio, the share removed, is 1 - budget); the first new token
comes from the prefill logits, the rest are decoded greedily at their original positions with
the hooks off, as kvpress's own pipeline does. One record per press and item goes to
``records``; a press that fails on an item (e.g. a prompt shorter than snapkv's window) records
``error`` instead of ``text``. The output is written atomically, with the versions of kvpress,
transformers and torch that produced it.

kvpress is imported inside main() only, so the module imports without it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from gemvlab.files import atomic_write_json
from gemvlab.models.checkpoint import weight_mismatch

PRESSES = {
    "streaming_llm": "StreamingLLMPress",
    "observed_attention": "ObservedAttentionPress",
    "snapkv": "SnapKVPress",
    "knorm": "KnormPress",
}
# ObservedAttentionPress scores with the attention weights, which only eager attention returns.
NEEDS_EAGER = {"observed_attention"}
INSTALL_HINT = "run bash scripts/install_kvpress.sh and put .whl/kvpress first on PYTHONPATH"


def compression_ratio(budget: float) -> float:
    """kvpress's compression_ratio (the share of the prompt's KV pairs removed) for a budget."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget {budget} must be in (0, 1]")
    return 1.0 - budget


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gemvlab.kv.evict.peer_kvpress",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="local model folder")
    parser.add_argument("--input", required=True, type=Path, help="items.json")
    parser.add_argument("--output", required=True, type=Path, help="where to write the records")
    return parser.parse_args(argv)


def _import_kvpress() -> Any:
    try:
        import kvpress
        import transformers
    except Exception as e:  # any failure to import has the same fix
        sys.exit(f"peer_kvpress: cannot import kvpress ({type(e).__name__}: {e}); {INSTALL_HINT}")
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    if (major, minor) >= (5, 3):
        sys.exit(f"peer_kvpress: kvpress 0.5.5 needs transformers<5.3, got "
                 f"{transformers.__version__} from {transformers.__file__}; {INSTALL_HINT}")
    return kvpress


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kvpress = _import_kvpress()
    from importlib.metadata import version

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    transformers.utils.logging.disable_progress_bar()

    spec = json.loads(args.input.read_text())
    max_new_tokens = int(spec["max_new_tokens"])
    if max_new_tokens < 1:
        sys.exit(f"peer_kvpress: max_new_tokens must be at least 1, got {max_new_tokens}")
    presses = spec["presses"]
    items = spec["items"]
    for p in presses:
        if p["name"] not in PRESSES:
            sys.exit(f"peer_kvpress: unknown press {p['name']!r}; known: {sorted(PRESSES)}")
        compression_ratio(float(p["budget"]))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    add_special = bool(spec.get("add_special_tokens", True))
    prompts = {}
    for item in items:
        ids = item.get("input_ids")
        if ids is None:
            ids = tokenizer(item["prompt"], add_special_tokens=add_special)["input_ids"]
        prompts[item["id"]] = torch.tensor([list(ids)], dtype=torch.long)

    models: dict[str, Any] = {}

    def load(attn: str) -> Any:
        if attn not in models:
            model, info = AutoModelForCausalLM.from_pretrained(
                args.model, dtype=torch.float32, use_safetensors=True, trust_remote_code=False,
                attn_implementation=attn, output_loading_info=True,
                ignore_mismatched_sizes=True)
            problem = weight_mismatch(info)
            if problem:  # the main process loaded them: this transformers reads them otherwise
                sys.exit(f"peer_kvpress: {args.model}'s weights do not fit "
                         f"{type(model).__name__} under transformers "
                         f"{transformers.__version__}: {problem}; reinstall the side folder "
                         "with bash scripts/install_kvpress.sh")
            models[attn] = model.eval()
        return models[attn]

    records = []
    for p in presses:
        name, budget = p["name"], float(p["budget"])
        attn = p.get("attn_implementation", "eager" if name in NEEDS_EAGER else "sdpa")
        extra = {k: v for k, v in p.items() if k not in ("name", "budget", "attn_implementation")}
        ratio = compression_ratio(budget)
        press = getattr(kvpress, PRESSES[name])(compression_ratio=ratio, **extra)
        model = load(attn)
        stop = spec.get("stop_ids")
        if stop is None:
            eos = model.generation_config.eos_token_id
            stop = [] if eos is None else eos if isinstance(eos, list) else [eos]
        for item in items:
            ids = prompts[item["id"]]
            record: dict[str, Any] = {
                "id": item["id"], "press": name, "budget": budget, "compression_ratio": ratio,
                "press_args": extra, "attn_implementation": attn, "prompt_tokens": ids.shape[1]}
            try:
                record.update(_run_one(model, press, ids, max_new_tokens, set(stop),
                                       DynamicCache, torch))
                record["text"] = tokenizer.decode(record["token_ids"], skip_special_tokens=True)
            except Exception as e:  # one failing press/item must not end the rest
                record["error"] = f"{type(e).__name__}: {e}"
                print(f"peer_kvpress: {name} on {item['id']}: {record['error']}", file=sys.stderr)
            records.append(record)

    atomic_write_json(args.output, {
        "kvpress_version": version("kvpress"),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "transformers_path": str(Path(transformers.__file__).parent),
        "model": str(args.model),
        "max_new_tokens": max_new_tokens,
        "stop_ids": spec.get("stop_ids"),
        "records": records,
    })
    return 0


def _run_one(model: Any, press: Any, ids: Any, max_new_tokens: int, stop: set[int],
             cache_cls: Any, torch: Any) -> dict[str, Any]:
    """Prefill under the press, then greedy decoding with the pruned cache (hooks off)."""
    n = ids.shape[1]
    cache = cache_cls()
    with torch.no_grad():
        t0 = time.perf_counter()
        with press(model):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        kept = cache.get_seq_length()
        per_layer = [layer.keys.shape[-2] for layer in cache.layers]
        token = int(out.logits[0, -1].argmax())
        new = [token]
        t1 = time.perf_counter()
        for step in range(1, max_new_tokens):
            if token in stop:
                break
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache,
                        position_ids=torch.tensor([[n + step - 1]]), use_cache=True)
            token = int(out.logits[0, -1].argmax())
            new.append(token)
        decode_s = time.perf_counter() - t1
    return {"kept_tokens": kept, "kept_tokens_uniform": len(set(per_layer)) == 1,
            "token_ids": new, "new_tokens": len(new), "prefill_s": round(prefill_s, 4),
            "decode_s": round(decode_s, 4)}


if __name__ == "__main__":
    sys.exit(main())
