"""The shared token basis of logit footprints (SPEC.md section 2).

The basis is a list of K token *strings*, so that experts with different tokenizers share one
coordinate system. How the strings are found (a decision, documented here): the probe texts
are split with a tokenizer-independent GPT-2-style pre-tokenizer (a word with its leading
space, a run of punctuation with its leading space, line breaks), except that numbers are split
into single digits without a space, as the number-splitting vocabularies of Llama-3, Qwen and
Gemma do (with " 12" as a string, most tokenizers' first sub-token would be a bare space, and
every number in the probes would collapse onto that one token). The K most frequent pieces are
kept (ties broken by the string, so the basis is a pure function of the probe texts). No
reference model's vocabulary is involved: the same probes give the same basis on any machine.

Each expert maps every basis string to its own token id: the first sub-token of
``tokenizer.encode(string)`` without special tokens (the string " the" becomes GPT-2's "Ġthe",
SentencePiece's "▁the", and so on). The basis id is a hash of the strings; descriptors are
stored under it, and footprints computed with different bases are never compared.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# word (letters) with its leading space | one digit | punctuation run | newlines | underscores
_PIECE = re.compile(r" ?[^\W\d_]+|\d| ?[^\s\w]+|\n+| ?_+")


def pre_tokenize(text: str) -> list[str]:
    """Split text into tokenizer-independent pieces (strings with their leading space)."""
    return _PIECE.findall(text)


@dataclass(frozen=True)
class TokenBasis:
    strings: tuple[str, ...]  # the K basis strings, most frequent first

    def __post_init__(self) -> None:
        if len(self.strings) < 2:
            raise ValueError(f"a token basis needs at least 2 strings, got {len(self.strings)}")
        if len(set(self.strings)) != len(self.strings):
            raise ValueError("token basis strings must be unique")

    @property
    def size(self) -> int:
        return len(self.strings)

    @property
    def basis_id(self) -> str:
        """A content hash of the strings: footprints share coordinates iff their ids match."""
        digest = hashlib.sha256(json.dumps(list(self.strings)).encode()).hexdigest()
        return f"tok{self.size}-{digest[:16]}"

    @staticmethod
    def from_texts(texts: Iterable[str], size: int = 256) -> TokenBasis:
        """The ``size`` most frequent pre-tokenized strings over the texts."""
        if size < 2:
            raise ValueError(f"basis size must be >= 2, got {size}")
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(pre_tokenize(str(t)))
        if len(counts) < size:
            raise ValueError(
                f"the probe texts hold only {len(counts)} distinct token strings, fewer than the "
                f"basis size {size}: use more probes or a smaller basis")
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return TokenBasis(tuple(s for s, _ in ranked[:size]))

    def to_dict(self) -> dict[str, Any]:
        return {"basis_id": self.basis_id, "strings": list(self.strings)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TokenBasis:
        basis = TokenBasis(tuple(d["strings"]))
        if "basis_id" in d and d["basis_id"] != basis.basis_id:
            raise ValueError(f"basis id mismatch: file says {d['basis_id']}, strings hash to {basis.basis_id}")
        return basis

    def token_ids(self, tokenizer: Any) -> list[int]:
        """Map each basis string to the tokenizer's id (first sub-token when the string splits)."""
        return map_strings(tokenizer, self.strings)


def map_strings(tokenizer: Any, strings: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for s in strings:
        enc = tokenizer.encode(s, add_special_tokens=False)
        if not enc:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} encodes {s!r} to no token")
        ids.append(int(enc[0]))
    return ids
