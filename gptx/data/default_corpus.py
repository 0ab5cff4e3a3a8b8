"""The corpus a run trains on when no --data is given: Python's own documentation, tokenized once and cached."""
from __future__ import annotations

import fcntl
import hashlib
import sys
from pathlib import Path

from gptx.data.prepare import write_token_files
from gptx.data.tokens import META_FILE, PREPARING, cache_dir, gpt2_encoding


def default_corpus_texts() -> list[str]:
    """English text every Python install carries: the documentation topics of pydoc_data."""
    from pydoc_data.topics import topics
    return [topics[key] for key in sorted(topics)]


def default_data_dir(log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The embedded corpus, tokenized once with GPT-2 BPE and cached."""
    texts = default_corpus_texts()
    # The split rule is part of the name: a cache made before val.bin began at a document's start
    # would give another val loss for the same run.
    digest = hashlib.sha256(("\0".join(texts) + "\0split: the nearest document boundary").encode()).hexdigest()[:12]
    out = cache_dir() / f"pydoc-{digest}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process per machine tokenizes; the others wait for it
        if not (out / META_FILE).exists() or (out / PREPARING).exists():
            log(f"gptx: tokenizing the embedded Python documentation corpus into {out}")
            write_token_files(texts, out, gpt2_encoding(), val_fraction=0.1, workers=1)
    return out
