"""Tiny, seeded, offline models and tokenizers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers


def make_tokenizer(bos: bool = False) -> transformers.PreTrainedTokenizerFast:
    """Byte-level tokenizer with one token per byte: any text, no network, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("</s>", "<pad>", "<s>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
        bos_token="<s>" if bos else None)


def make_llama(vocab_size: int, seed: int = 0, max_len: int = 256) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=max_len,
        tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).float().eval()


def make_gemma3(vocab_size: int, layer_types: list[str], seed: int = 0,
                max_len: int = 128) -> transformers.Gemma3ForCausalLM:
    """Gemma 3 text model with sliding-window (8 tokens) and full-attention layers."""
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=len(layer_types), num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, sliding_window=8, layer_types=layer_types, max_position_embeddings=max_len)
    return transformers.Gemma3ForCausalLM(config).float().eval()


def save_model_folder(folder: Path, bos: bool = False, seed: int = 0) -> Path:
    """A safetensors model folder, as a user would hand to model=local."""
    tokenizer = make_tokenizer(bos=bos)
    model = make_llama(len(tokenizer), seed=seed)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
