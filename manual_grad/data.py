"""Text data: tokenizers, the embedded default corpus, the train/val split and batch sampling.

Tokenizers (each has ``encode(str) -> (N,) int32``, ``decode(ids) -> str``, ``vocab_size`` and
``to_dict()``; :func:`tokenizer_from_dict` rebuilds one from a checkpoint):

- :class:`CharTokenizer`: one token per Unicode character of the corpus (nanoGPT's
  shakespeare_char), ids in sorted character order.
- :class:`ByteTokenizer`: one token per UTF-8 byte, V = 256; encodes any text.
- :class:`BPETokenizer`: GPT-2's byte-level BPE, read from local ``vocab.json`` and
  ``merges.txt`` files (nothing is downloaded).

The default corpus (:func:`stdlib_corpus`) is the Python standard library's own source: the
``*.py`` files at the top of the running interpreter's stdlib folder, in sorted file-name
order, concatenated and capped at ``max_chars``. Every Python install has it, so the main job
runs with no download and no data file.

Batches (:func:`get_batch`) are a pure function of ``(seed, split, step)``: the data position
saved in a checkpoint is the step, and a resumed run draws exactly the batches the straight
run would have drawn.
"""
from __future__ import annotations

import json
import math
import os
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["CharTokenizer", "ByteTokenizer", "BPETokenizer", "TOKENIZERS", "make_tokenizer",
           "tokenizer_from_dict", "load_text", "stdlib_corpus", "split_tokens", "check_block_size",
           "BatchSpec", "get_batch",
           "DEFAULT_MAX_CHARS", "SPLITS"]

TOKENIZERS = ("char", "byte", "gpt2")
SPLITS = ("train", "val")
DEFAULT_MAX_CHARS = 4_000_000   # the stdlib corpus is capped at this many characters


# --- tokenizers ------------------------------------------------------------------------------

class CharTokenizer:
    """One token per character; ``chars`` lists the vocabulary in id order."""

    kind = "char"

    def __init__(self, chars: str):
        if not chars:
            raise ValueError("chars must be a non-empty string (the vocabulary)")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not repeat a character")
        self.chars = chars
        self._codes = np.array([ord(c) for c in chars], np.int64)     # sorted when built by from_text
        self._order = np.argsort(self._codes)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """(N,) int32 ids; a character outside the vocabulary raises ValueError."""
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
        sorted_codes = self._codes[self._order]
        pos = np.clip(np.searchsorted(sorted_codes, codes), 0, len(sorted_codes) - 1)
        unknown = sorted_codes[pos] != codes
        if unknown.any():
            missing = sorted({chr(c) for c in codes[unknown]})
            raise ValueError(f"text has {len(missing)} character(s) outside the tokenizer's "
                             f"vocabulary, e.g. {missing[:5]!r}")
        return self._order[pos].astype(np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in np.asarray(ids).ravel())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer:
    """One token per UTF-8 byte (V = 256); decoding replaces broken sequences with U+FFFD."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, np.uint8).ravel().tolist()).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": self.kind}


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters: printable Latin-1
    bytes map to themselves, the others to U+0100 onwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _pretokenize_pattern():
    """GPT-2's pre-tokenizer regex (contractions, letters, numbers, other, spaces), compiled
    with the ``regex`` package (a dependency): ``re`` has no ``\\p{L}``/``\\p{N}``, and any
    stand-in would split some text differently from GPT-2, so without ``regex`` it is an error."""
    try:
        import regex
    except ImportError:
        raise ImportError("the GPT-2 tokenizer needs the 'regex' package for GPT-2's exact pre-tokenizer "
                          "(pip install regex)") from None
    return regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


class BPETokenizer:
    """GPT-2's byte-level BPE from local files: ``vocab.json`` (token -> id) and ``merges.txt``
    (one merge ``a b`` a line, highest priority first, after a ``#version`` header)."""

    kind = "gpt2"

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], source: str = ""):
        self.encoder = dict(vocab)
        self.merges = [tuple(pair) for pair in merges]
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.source = source
        self._byte_chars = _bytes_to_unicode()
        self._char_bytes = {c: b for b, c in self._byte_chars.items()}
        self._pattern = _pretokenize_pattern()
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_dir(cls, directory) -> "BPETokenizer":
        directory = Path(directory)
        vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise ValueError(f"GPT-2 tokenizer: {p} not found (a BPE folder needs vocab.json and merges.txt)")
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"GPT-2 tokenizer: {vocab_path} is not valid JSON ({e})") from None
        merges = []
        for line in merges_path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#version") or not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"GPT-2 tokenizer: bad line in {merges_path}: {line!r}")
            merges.append((parts[0], parts[1]))
        return cls(vocab, merges, source=str(directory))

    @property
    def vocab_size(self) -> int:
        return max(self.encoder.values()) + 1

    def _bpe(self, word: str) -> list[int]:
        """Merge the lowest-ranked adjacent pair until none is in the merge table."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            rank, (first, second) = min(((self.ranks.get(pair, math.inf), pair)
                                         for pair in zip(parts, parts[1:])), key=lambda r: r[0])
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        try:
            ids = [self.encoder[p] for p in parts]
        except KeyError as e:
            raise ValueError(f"GPT-2 tokenizer: piece {e.args[0]!r} is not in vocab.json") from None
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> np.ndarray:
        ids = []
        for piece in self._pattern.findall(text):
            ids.extend(self._bpe("".join(self._byte_chars[b] for b in piece.encode("utf-8"))))
        return np.array(ids, np.int32)

    def decode(self, ids) -> str:
        chars = "".join(self.decoder[int(i)] for i in np.asarray(ids).ravel())
        return bytes(self._char_bytes[c] for c in chars).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        """The whole tokenizer (vocabulary and merges), so a checkpoint needs no outside file."""
        return {"kind": self.kind, "source": self.source, "vocab": self.encoder,
                "merges": [" ".join(pair) for pair in self.merges]}

    def save(self, directory) -> None:
        """Writes GPT-2's ``vocab.json`` and ``merges.txt`` to ``directory`` (read back by
        :meth:`from_dir` and by ``transformers.GPT2Tokenizer``)."""
        directory = Path(directory)
        (directory / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(" ".join(pair) for pair in self.merges)]
        (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_tokenizer(kind: str, text: str | None = None, *, bpe_dir=None):
    """A tokenizer of ``kind`` (:data:`TOKENIZERS`): "char" builds its vocabulary from
    ``text``; "gpt2" reads ``bpe_dir``/vocab.json and merges.txt."""
    if kind == "char":
        if not text:
            raise ValueError("text must be non-empty to build a character vocabulary")
        return CharTokenizer.from_text(text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2":
        if bpe_dir is None:
            raise ValueError("bpe_dir is required for the gpt2 tokenizer (a folder with vocab.json and merges.txt)")
        return BPETokenizer.from_dir(bpe_dir)
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {kind!r}")


def tokenizer_from_dict(d: dict):
    """Inverse of ``tokenizer.to_dict()`` (a gpt2 tokenizer stored before it carried its
    vocabulary re-reads its source folder)."""
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "gpt2" and "vocab" in d:
        return BPETokenizer(d["vocab"], [tuple(m.split(" ")) for m in d["merges"]], source=d.get("source", ""))
    if kind == "gpt2":
        return BPETokenizer.from_dir(d["source"])
    raise ValueError(f"tokenizer: unknown kind {kind!r}")


# --- corpora ---------------------------------------------------------------------------------

def load_text(path) -> str:
    """The UTF-8 text of ``path``; ValueError naming the file when it is missing, a folder,
    not UTF-8, or empty."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        raise ValueError(f"data file {str(path)!r} is empty")
    return text


def stdlib_corpus(max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """The Python standard library's top-level ``*.py`` sources, in sorted file-name order,
    each preceded by a ``# file: NAME`` line, concatenated and cut at ``max_chars``.

    Deterministic for a given interpreter; a few MB on any CPython 3.10+.
    """
    if not isinstance(max_chars, int) or max_chars <= 0:
        raise ValueError(f"max_chars must be a positive integer, got {max_chars!r}")
    folder = Path(sysconfig.get_paths()["stdlib"])
    pieces, total = [], 0
    for path in sorted(folder.glob("*.py"), key=lambda p: p.name):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        piece = f"# file: {path.name}\n{source}\n"
        pieces.append(piece)
        total += len(piece)
        if total >= max_chars:
            break
    text = "".join(pieces)[:max_chars]
    if not text:
        raise ValueError(f"no Python sources found in the standard library folder {os.fspath(folder)!r}")
    return text


# --- splits and batches ----------------------------------------------------------------------

def split_tokens(tokens: np.ndarray, val_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """First ``1 - val_fraction`` of the tokens for training, the rest for validation (nanoGPT)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_train = int(len(tokens) * (1 - val_fraction))
    return {"train": tokens[:n_train], "val": tokens[n_train:]}


def check_block_size(splits: dict[str, np.ndarray], block_size: int) -> None:
    """Each split must hold at least ``block_size + 1`` tokens (inputs and shifted targets)."""
    for name, tokens in splits.items():
        if len(tokens) < block_size + 1:
            raise ValueError(f"block_size={block_size} is too large for the {name} split "
                             f"({len(tokens)} tokens; needs at least block_size + 1)")


@dataclass(frozen=True)
class BatchSpec:
    """Where a batch comes from: ``(seed, split, step)`` fixes it completely."""
    seed: int
    batch_size: int
    block_size: int


def get_batch(tokens: np.ndarray, spec: BatchSpec, split: str, step: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` int32 ``(B, T)`` with ``y[b, t] = x[b, t + 1]``: B windows at random offsets.

    The offsets are drawn from a generator seeded by ``(seed, split, step)`` alone, so any
    batch can be re-drawn without replaying the ones before it.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    B, T = spec.batch_size, spec.block_size
    if len(tokens) < T + 1:
        raise ValueError(f"block_size={T} needs at least {T + 1} tokens, the split has {len(tokens)}")
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), step])
    offsets = rng.integers(0, len(tokens) - T, size=B)                     # (B,)
    windows = tokens[offsets[:, None] + np.arange(T + 1)]                   # (B, T + 1)
    return windows[:, :-1].astype(np.int32), windows[:, 1:].astype(np.int32)
