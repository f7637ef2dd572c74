"""Tokenizers, the stdlib corpus, splits and batches (manual_grad.data)."""
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from manual_grad import data
from manual_grad.data import (BatchSpec, BPETokenizer, ByteTokenizer, CharTokenizer, get_batch, load_text,
                              make_tokenizer, split_tokens, stdlib_corpus, tokenizer_from_dict)

TEXT = "Hello, wörld! naïve café 123\n\tThe end — ok?"


@pytest.mark.parametrize("tokenizer", [CharTokenizer.from_text(TEXT), ByteTokenizer()], ids=["char", "byte"])
def test_round_trip_and_rebuild(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < tokenizer.vocab_size
    assert tokenizer.decode(ids) == TEXT
    again = tokenizer_from_dict(json.loads(json.dumps(tokenizer.to_dict())))
    assert np.array_equal(again.encode(TEXT), ids)


def test_char_ids_follow_sorted_characters():
    tok = CharTokenizer.from_text("cab\nba")
    assert tok.chars == "\nabc"
    assert tok.encode("abc\n").tolist() == [1, 2, 3, 0]


def test_char_unknown_character_is_a_value_error():
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        CharTokenizer.from_text("abc").encode("abd")


def test_byte_ids_are_utf8_bytes():
    assert ByteTokenizer().encode("é").tolist() == list("é".encode("utf-8"))


def _write_bpe(folder: Path, merges):
    """A byte-level vocabulary (all 256 byte characters) plus the merged tokens, in merge order."""
    byte_chars = list(data._bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(byte_chars)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    return vocab


MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("a", "t"), ("Ġ", "c"),
          ("Ġc", "at"), ("'", "s"), ("e", "r"), ("1", "2"), ("Ġ", "Ġ")]


def test_bpe_worked_example(tmp_path):
    vocab = _write_bpe(tmp_path, MERGES)
    tok = BPETokenizer.from_dir(tmp_path)
    # pre-tokens: "the" " cat" "'s" " in": merges by rank: "Ġt"+"he" needs "Ġt" (rank 0) and "he" (1)
    ids = tok.encode("the cat's in")
    expected = [vocab["t"], vocab["he"], vocab["Ġcat"], vocab["'s"], vocab["Ġ"], vocab["in"]]
    assert ids.tolist() == expected
    assert tok.decode(ids) == "the cat's in"
    assert tok.vocab_size == len(vocab)


def test_bpe_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the interop extra provides the reference")
    _write_bpe(tmp_path, MERGES)
    ours = BPETokenizer.from_dir(tmp_path)
    theirs = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for text in ["the cat's in the hat", "  two  spaces\n\nand 123 numbers 12", TEXT, "they're ok, aren't we?"]:
        assert ours.encode(text).tolist() == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == text


def test_bpe_checkpoint_dict_carries_vocab_and_merges(tmp_path):
    """A checkpoint's tokenizer needs no outside file: the folder it came from can be gone."""
    folder = tmp_path / "bpe"
    folder.mkdir()
    _write_bpe(folder, MERGES)
    tok = BPETokenizer.from_dir(folder)
    stored = json.loads(json.dumps(tok.to_dict()))
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink()
    again = tokenizer_from_dict(stored)
    text = "the cat's in the hat 12"
    assert again.encode(text).tolist() == tok.encode(text).tolist() and again.decode(again.encode(text)) == text
    again.save(tmp_path)                                   # and writes GPT-2's files back
    assert BPETokenizer.from_dir(tmp_path).encode(text).tolist() == tok.encode(text).tolist()


def test_bpe_without_regex_is_an_error_not_a_different_split(tmp_path, monkeypatch):
    _write_bpe(tmp_path, MERGES)
    monkeypatch.setitem(__import__("sys").modules, "regex", None)      # import regex -> ImportError
    with pytest.raises(ImportError, match="'regex' package"):
        BPETokenizer.from_dir(tmp_path)


def test_bpe_needs_both_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(ValueError, match="merges.txt"):
        BPETokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="bpe_dir"):
        make_tokenizer("gpt2")
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        make_tokenizer("words", "abc")


def test_stdlib_corpus_is_the_sorted_stdlib_sources():
    text = stdlib_corpus(200_000)
    assert text == stdlib_corpus(200_000)                 # deterministic
    assert len(text) == 200_000
    first = min(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.name)
    header = f"# file: {first.name}\n"
    assert text.startswith(header)
    source = first.read_text(encoding="utf-8")
    assert text[len(header):len(header) + min(len(source), 1000)] == source[:1000]
    assert "def " in text and "import " in text


def test_split_is_prefix_and_suffix():
    tokens = np.arange(100)
    splits = split_tokens(tokens, 0.1)
    assert splits["train"].tolist() == list(range(90)) and splits["val"].tolist() == list(range(90, 100))


def test_get_batch_is_windows_and_pure_in_seed_split_step():
    tokens = np.arange(1000, dtype=np.int32)
    spec = BatchSpec(seed=3, batch_size=16, block_size=8)
    x, y = get_batch(tokens, spec, "train", 7)
    assert x.shape == y.shape == (16, 8) and x.dtype == np.int32
    assert np.array_equal(x, x[:, :1] + np.arange(8))     # contiguous windows of the token stream
    assert np.array_equal(y, x + 1)                        # targets are the next tokens
    assert x.min() >= 0 and y.max() <= 999
    x2, y2 = get_batch(tokens, spec, "train", 7)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, get_batch(tokens, spec, "train", 8)[0])
    assert not np.array_equal(x, get_batch(tokens, spec, "val", 7)[0])
    assert not np.array_equal(x, get_batch(tokens, BatchSpec(4, 16, 8), "train", 7)[0])


def test_get_batch_reaches_both_ends():
    tokens = np.arange(10, dtype=np.int32)
    starts = {int(get_batch(tokens, BatchSpec(0, 8, 8), "train", s)[0][b, 0]) for s in range(20) for b in range(8)}
    assert starts == {0, 1}                                # the last window ends at the last token


def test_block_size_larger_than_split():
    splits = split_tokens(np.arange(50), 0.1)              # val has 5 tokens
    with pytest.raises(ValueError, match="block_size=8 is too large for the val split"):
        data.check_block_size(splits, 8)
    data.check_block_size(splits, 4)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), (b"", "is empty"), (b"\xff\xfe\xfa", "not UTF-8"), ("dir", "not a regular file")])
def test_load_text_errors(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_text(path)
