"""Token-level perplexity in GPTQ style (not lm-eval's word perplexity).

Documents are joined with "\\n\\n" and tokenized once. Windows of `context_length` tokens start
every `stride` tokens; each token is scored exactly once, in the first window that holds it with
at least one token of context (or BOS) before it. With `bos_id`, every window starts with BOS,
which is never scored, so with stride == context_length every token is scored. perplexity =
exp(sum of token NLL / number of scored tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gemvlab.errors import GemvlabError
from gemvlab.eval.guards import check_finite


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll_sum: float
    tokens: int


@dataclass(frozen=True)
class Window:
    begin: int        # first token of the corpus in the window
    end: int          # one past the last
    first_scored: int  # first corpus position scored in this window


def plan_windows(n_tokens: int, context_length: int, stride: int, with_bos: bool) -> list[Window]:
    if context_length < 2 or not 1 <= stride <= context_length:
        raise GemvlabError(f"perplexity needs context_length >= 2 and 1 <= stride <= "
                           f"context_length, got {context_length} and {stride}")
    body = context_length - 1 if with_bos else context_length
    step = min(stride, body)
    windows, scored_to = [], 0
    for begin in range(0, n_tokens, step):
        end = min(begin + body, n_tokens)
        first = max(scored_to, begin if with_bos else begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
            scored_to = end
        if end == n_tokens:
            break
    return windows


@torch.inference_mode()
def token_perplexity(model: torch.nn.Module, ids: torch.Tensor, *, context_length: int,
                     stride: int, bos_id: int | None = None, batch_size: int = 1,
                     progress: str | None = None) -> Perplexity:
    """Perplexity of a 1-D token tensor under a causal LM."""
    ids = ids.flatten().long()
    windows = plan_windows(ids.numel(), context_length, stride, bos_id is not None)
    if not windows:
        raise GemvlabError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    device = next(model.parameters()).device
    prefix = [bos_id] if bos_id is not None else []
    nll_sum, count = 0.0, 0
    # Windows of equal length batch together; only the last one may be shorter.
    groups: list[list[Window]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and \
                groups[-1][0].end - groups[-1][0].begin == w.end - w.begin:
            groups[-1].append(w)
        else:
            groups.append([w])
    for group in tqdm(groups, desc=progress or "perplexity", disable=progress is None):
        rows = [torch.cat([torch.tensor(prefix, dtype=torch.long), ids[w.begin:w.end]])
                for w in group]
        batch = torch.stack(rows).to(device)
        token_logp = target_logprobs(model, batch, progress or "perplexity")
        for row, w in enumerate(group):
            # Target at corpus position p sits at column p - begin + len(prefix) - 1.
            start = w.first_scored - w.begin + len(prefix) - 1
            scored = token_logp[row, start:]
            nll_sum -= scored.double().sum().item()
            count += scored.numel()
    return Perplexity(math.exp(nll_sum / count), nll_sum, count)


# Tokens per output-head chunk: [chunk, vocab] logits stay small (Gemma's vocab is 262k).
_HEAD_CHUNK = 256
# Config fields of models whose head does more than a plain projection; those run whole.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def target_logprobs(model: torch.nn.Module, batch: torch.Tensor, where: str) -> torch.Tensor:
    """log p(batch[:, t+1] | batch[:, :t+1]) as [B, L-1] float32.

    log p(target) = logit(target) - logsumexp(logits), with the output head applied to a few
    hundred positions at a time: the full [B, L, vocab] logits (2 GB for Gemma at 4 x 512)
    never exist, which halves the time of a large-vocabulary model on the CPU.
    """
    targets = batch[:, 1:]
    body, head = model.get_decoder(), model.get_output_embeddings()
    plain_head = isinstance(head, torch.nn.Linear) and not any(
        getattr(model.config, name, None) for name in _HEAD_EXTRAS)
    if not plain_head:
        logits = model(batch).logits[:, :-1].float()
        check_finite(logits, where)
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    hidden = body(input_ids=batch).last_hidden_state[:, :-1]
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = torch.empty(flat_targets.shape, dtype=torch.float32, device=batch.device)
    for start in range(0, flat_targets.numel(), _HEAD_CHUNK):
        part = slice(start, start + _HEAD_CHUNK)
        logits = head(flat_hidden[part]).float()
        check_finite(logits, where)
        out[part] = logits.gather(-1, flat_targets[part, None]).squeeze(-1) - \
            logits.logsumexp(-1)
    return out.reshape(targets.shape)


def corpus_ids(tokenizer, documents: list[str], max_scored: int | None,
               with_bos: bool) -> torch.Tensor:
    """Join documents and tokenize without special tokens (BOS is added per window).

    Keeps just enough tokens for `max_scored` scored ones (without BOS the first is context).
    """
    text = "\n\n".join(documents)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_scored is not None:
        ids = ids[: int(max_scored) + (0 if with_bos else 1)]
    return ids


def bos_token_id(tokenizer) -> int | None:
    """BOS only for tokenizers that add it themselves (Gemma does, SmolLM2 does not)."""
    probe = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    return bos if bos is not None and probe and probe[0] == bos else None
