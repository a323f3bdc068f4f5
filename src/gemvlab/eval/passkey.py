"""Passkey retrieval prompts (Mohtashami and Jaggi, 2023): a number hidden in filler text."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it. For example, if the text says "
         "'The pass key is 12345', the answer is 12345.\n\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? Remember it. The pass key is"


@dataclass
class PasskeyPrompt:
    haystack: torch.Tensor   # [1, n]: everything before the question
    question: torch.Tensor   # [1, q]
    key: str
    depth: float


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def passkey_prompt(tokenizer, filler: list[int], length: int, depth: float,
                   key: str) -> PasskeyPrompt:
    """A prompt of exactly ``length`` tokens with the needle ``depth`` of the way into the
    filler."""
    intro, needle = _tokens(tokenizer, INTRO), _tokens(tokenizer, NEEDLE.format(key=key))
    question = _tokens(tokenizer, QUESTION)
    n_fill = length - len(intro) - len(needle) - len(question)
    if n_fill <= 0 or n_fill > len(filler):
        raise ValueError(f"a {length}-token passkey prompt needs {n_fill} filler tokens, "
                         f"{len(filler)} available")
    cut = int(depth * n_fill)
    hay = intro + filler[:cut] + needle + filler[cut:n_fill]
    return PasskeyPrompt(torch.tensor([hay]), torch.tensor([question]), key, depth)


def answer_correct(text: str, key: str) -> bool:
    """The first number in the answer is the key."""
    found = re.search(r"\d+", text)
    return bool(found) and found.group(0) == key
