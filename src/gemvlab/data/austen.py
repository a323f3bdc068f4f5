"""Jane Austen's six novels from the R package janeaustenr, read without R.

The package stores each novel as a character vector (one line of the Gutenberg text per
element) in an R lazy-load database: an index (.rdx, gzip) of offsets into .rdb, where each
object is a 4-byte length followed by a zlib stream of R serialization, which rdata parses.
"""

from __future__ import annotations

import gzip
import re
import warnings
import zlib
from dataclasses import dataclass

from gemvlab.errors import GemvlabError

_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\.?\s*$", re.IGNORECASE)
_VOLUME = re.compile(r"^\s*volume\s+[ivx0-9]+\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Chapter:
    doc_id: str      # e.g. "emma/ch012"
    novel: str
    number: int      # 0 is the front matter before the first chapter
    text: str        # paragraphs reflowed to one line each, separated by blank lines


def _parse_r(blob: bytes) -> object:
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that a bare stream is "assumed RDS"
        return rdata.conversion.convert(rdata.parser.parse_data(blob))


def read_novels(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """Lines of each novel, keyed by janeaustenr's object name (emma, persuasion, …)."""
    try:
        index = _parse_r(gzip.decompress(rdx))
        novels: dict[str, list[str]] = {}
        for name, (offset, length) in index["variables"].items():
            start, end = int(offset) + 4, int(offset) + int(length)
            lines = _parse_r(zlib.decompress(rdb[start:end]))
            novels[str(name)] = [str(line) for line in lines]
    except (OSError, zlib.error, KeyError, ValueError, TypeError) as exc:
        raise GemvlabError(f"cannot read the janeaustenr data files ({exc}): the package is "
                           "damaged or not version 1.0.0; download it again") from exc
    if len(novels) != 6:
        raise GemvlabError(f"expected 6 novels in janeaustenr, found {sorted(novels)}")
    return novels


def _reflow(lines: list[str]) -> str:
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def chapters(novel: str, lines: list[str]) -> list[Chapter]:
    """Cut a novel at its chapter headings; the headings themselves are dropped."""
    blocks: list[list[str]] = [[]]
    for line in lines:
        if _CHAPTER.match(line):
            blocks.append([])
        elif not _VOLUME.match(line):
            blocks[-1].append(line)
    out = []
    for number, block in enumerate(blocks):
        text = _reflow(block)
        if text:
            out.append(Chapter(f"{novel}/ch{number:03d}", novel, number, text))
    return out
