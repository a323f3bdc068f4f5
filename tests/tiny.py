"""Tiny, seeded, offline models and tokenizers shared by the tests."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import transformers


def _word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges that build each word, with and without its leading space, letter by letter
    (the spaced forms first: a merge's rank is its priority)."""
    from tokenizers import pre_tokenizers

    words = list(words)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    merges: dict[tuple[str, str], None] = {}
    for form in [f" {word}" for word in words] + words:
        (piece, _), = byte_level.pre_tokenize_str(form)
        for i in range(2, len(piece) + 1):
            merges[(piece[:i - 1], piece[i - 1])] = None
    return list(merges)


def make_tokenizer(bos: bool = False,
                   words: Iterable[str] = ()) -> transformers.PreTrainedTokenizerFast:
    """Byte-level tokenizer with one token per byte, plus one token per listed word (so that
    prompts written for real tokenizers fit in a few tokens): any text, no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = _word_merges(words)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("</s>", "<pad>", "<s>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
        bos_token="<s>" if bos else None)


def make_llama(vocab_size: int, seed: int = 0, max_len: int = 256, hidden: int = 32,
               head_dim: int = 16) -> transformers.LlamaForCausalLM:
    """Llama with grouped-query attention (two query heads per KV head)."""
    torch.manual_seed(seed)
    heads = hidden // head_dim
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=heads // 2, intermediate_size=2 * hidden,
        max_position_embeddings=max_len, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).float().eval()


def make_gemma3(vocab_size: int, layer_types: list[str], seed: int = 0,
                max_len: int = 128, hidden: int = 32,
                head_dim: int = 16) -> transformers.Gemma3ForCausalLM:
    """Gemma 3 text model with sliding-window (8 tokens) and full-attention layers."""
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=len(layer_types), num_attention_heads=2, num_key_value_heads=1,
        head_dim=head_dim, sliding_window=8, layer_types=layer_types,
        max_position_embeddings=max_len)
    return transformers.Gemma3ForCausalLM(config).float().eval()


def save_model_folder(folder: Path, bos: bool = False, seed: int = 0) -> Path:
    """A safetensors model folder, as a user would hand to model=local."""
    tokenizer = make_tokenizer(bos=bos)
    model = make_llama(len(tokenizer), seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
