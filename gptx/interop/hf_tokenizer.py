"""GPT-2's tokenizer files for a Hugging Face export, and which tokenizer files of an export directory
gptx wrote.

vocab.json and merges.txt are derived from the offline BPE ranks gptx trains with, so the directory
needs no download. A directory exported into before may also hold tokenizer files its user added (the
export of another vocabulary asks for them) or edited (a chat_template): the export marker records a
hash of each file gptx wrote, and a re-export replaces or removes only files that still have it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gptx.data.tokens import GPT2_EOT, gpt2_mergeable_ranks

EOT_TEXT = "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
RECORD_KEY = "tokenizer_files"
"""The export marker's table of the tokenizer files that export wrote, by name, to their sha256."""


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet, in which vocab.json and merges.txt spell tokens: printable
    Latin-1 bytes stand for themselves, the other 68 take the characters from U+0100 on."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    alphabet, shifted = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + shifted)
            shifted += 1
    return alphabet


def _merged_pair(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens whose merge made `token`: BPE on its bytes with only the older merges."""
    newest = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, newest), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= newest:
            raise AssertionError(f"BPE rank file: token {token!r} is not a merge of older tokens")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def gpt2_tokenizer_files(max_length: int) -> dict[str, bytes]:
    """vocab.json, merges.txt and the tokenizer config transformers' GPT-2 tokenizers read, by file name."""
    ranks = gpt2_mergeable_ranks()
    alphabet = _byte_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)
    vocab = {spell(token): rank for token, rank in ranks.items()}
    vocab[EOT_TEXT] = GPT2_EOT
    merges = ["#version: 0.2"]
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        merges.append(" ".join(spell(part) for part in _merged_pair(token, ranks)))
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False,
              **special}
    return {"vocab.json": (json.dumps(vocab, ensure_ascii=False) + "\n").encode("utf-8"),
            "merges.txt": ("\n".join(merges) + "\n").encode("utf-8"),
            "special_tokens_map.json": (json.dumps(special, indent=2) + "\n").encode(),
            "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode()}


def file_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def written_by_gptx(out: Path, marker: Path) -> list[str]:
    """The tokenizer files in `out` that an earlier export wrote and nothing has changed since."""
    present = {name: (out / name).read_bytes() for name in TOKENIZER_FILES if (out / name).is_file()}
    if not present or not marker.exists():
        return []
    try:
        hashes = json.loads(marker.read_bytes()).get(RECORD_KEY)
    except (OSError, ValueError, AttributeError):  # unreadable, or JSON but not an object
        hashes = None
    if isinstance(hashes, dict):
        return [name for name, data in present.items() if hashes.get(name) == file_hash(data)]
    # A marker of a gptx that recorded no hashes: its tokenizer files are GPT-2's as gptx writes them,
    # whatever the model's context (model_max_length) was.
    gpt2 = gpt2_tokenizer_files(0)

    def as_written(name: str, data: bytes) -> bool:
        if name != "tokenizer_config.json":
            return data == gpt2[name]
        try:
            theirs = json.loads(data)
        except ValueError:
            return False
        return isinstance(theirs, dict) and {**theirs, "model_max_length": 0} == json.loads(gpt2[name])
    return [name for name, data in present.items() if as_written(name, data)]


def tokenizer_plan(out: Path, marker: Path, wanted: dict[str, bytes]) -> tuple[dict[str, bytes], list[str], list[str]]:
    """(the tokenizer files to write, an earlier export's to remove, the user's left as they are) for an
    export into `out` that would write `wanted`."""
    ours = written_by_gptx(out, marker)
    kept = [name for name in TOKENIZER_FILES if (out / name).exists() and name not in ours]
    write = {name: data for name, data in wanted.items() if name not in kept}
    return write, [name for name in ours if name not in write], kept
