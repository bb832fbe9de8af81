"""The prompt vocabulary shared by the prompt model, the captioner and the world's renderer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from cg4ctr_tasks.errors import UserError

KINDS = ("colour", "light", "texture", "material", "scene", "style")


@dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]
    kinds: tuple[str, ...]  # kinds[i] is the kind of tokens[i]

    def index(self, token: str) -> int:
        return self.tokens.index(token)

    def of_kind(self, kind: str) -> list[str]:
        return [t for t, k in zip(self.tokens, self.kinds, strict=True) if k == kind]

    def kind_of(self, token: str) -> str:
        return self.kinds[self.index(token)]

    def __len__(self) -> int:
        return len(self.tokens)


def parse_vocab(text: str, source: str) -> Vocab:
    tokens: list[str] = []
    kinds: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, sep, token = (part.strip() for part in line.partition(":"))
        if not sep or kind not in KINDS or not token.isalpha() or not token.islower():
            raise UserError(
                f"{source}:{number}: expected 'kind: token' with kind in {KINDS} and a "
                f"lower-case word, got {raw!r}"
            )
        if token in tokens:
            raise UserError(f"{source}:{number}: duplicate token {token!r}")
        tokens.append(token)
        kinds.append(kind)
    if not tokens:
        raise UserError(f"{source}: the vocabulary is empty")
    return Vocab(tuple(tokens), tuple(kinds))


@lru_cache(maxsize=8)
def load_vocab(path: str | None = None) -> Vocab:
    """Load the vocab file named in params (``vocab``), or the packaged default."""
    if path is None:
        text = resources.files("cg4ctr_tasks").joinpath("defaults/vocab.txt").read_text("utf-8")
        return parse_vocab(text, "defaults/vocab.txt")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"vocab file not found: {path}")
    return parse_vocab(file.read_text("utf-8"), str(path))
