"""Text -> token files (train.bin, val.bin, meta.json) at any corpus size.

Documents come from gptx.data.documents. Batches of about a megabyte of text are tokenized on
`workers` processes and written in input order, with at most a few batches per worker in
flight, so memory stays flat whatever the corpus size.
Every output is staged in a temporary folder inside the output directory and moved in at
the end; while they are being moved a PREPARING marker is there, and a directory with it is
refused by the readers, so an interrupted run never leaves a mix of old and new files. A run
that fails removes the output directory it created (and marks it PREPARING until it is done,
in case it is killed), so no empty or half-written --out is left behind.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from gptx.atomic import atomic_write
from gptx.data.documents import DocumentPiece
from gptx.data.tokens import META_FILE, PREPARING, token_dtype
from gptx.errors import DataError

BATCH_CHARS = 1 << 20
"""Text per tokenization task."""


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_encoding = None  # each worker's tokenizer (set by _init_worker)


def _init_worker(encoding) -> None:
    global _encoding
    _encoding = encoding


def _encode(texts: list[str]) -> tuple[bytes, int, int]:
    """(token bytes with end-of-text after each document, documents ended, UTF-8 bytes read).

    A DocumentPiece goes on in the next text: no end-of-text after it."""
    dtype = token_dtype(_encoding.n_vocab)
    eot = _encoding.eot_token
    out = bytearray()
    ended = 0
    for text, ids in zip(texts, _encoding.encode_ordinary_batch(texts, num_threads=1)):
        if not isinstance(text, DocumentPiece):
            ids.append(eot)
            ended += 1
        out += np.asarray(ids, dtype=dtype).tobytes()
    return bytes(out), ended, sum(len(t.encode("utf-8")) for t in texts)


def _encoded_in_order(documents: Iterable[str], encoding, workers: int) -> Iterator[tuple[bytes, int, int]]:
    """_encode over batches of documents on `workers` processes, in input order, with at most
    2 batches per worker waiting (the reader never runs far ahead of the writer)."""
    if workers == 1:
        _init_worker(encoding)
        yield from map(_encode, _batches(documents))
        return
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(encoding,)) as pool:
        pending: deque = deque()
        for batch in _batches(documents):
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class Progress:
    """MB read, MB/s, documents and tokens on one self-updating stderr line (tqdm's), on a terminal only."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr  # looked up now: a redirected stderr is honoured
        live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(unit="B", unit_scale=True, unit_divisor=1000, file=self.stream, disable=not live,
                        mininterval=0.5, dynamic_ncols=True)
        self.documents = self.tokens = 0

    def add(self, documents: int, n_bytes: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bar.set_postfix_str(f"{self.documents:,} documents, {self.tokens:,} tokens", refresh=False)
        self.bar.update(n_bytes)

    def message(self, line: str) -> None:
        """A line of its own (a warning), above the progress line while it is live."""
        if self.bar.disable:
            print(line, file=self.stream, flush=True)
        else:
            self.bar.write(line, file=self.stream)

    def close(self) -> None:
        self.bar.close()


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def document_cut(stream_path: Path, dtype: np.dtype, n: int, cut: int, eot: int) -> int:
    """Where train.bin ends in a stream of n tokens: at the document boundary (just after an
    end-of-text) nearest to token `cut`, so that no document is trained on in part and validated
    on in part; `cut` itself when none lies within half the val split's length either way (a
    document longer than that is cut, rather than val.bin growing or shrinking by most of it)."""
    reach = max(1, min((n - cut) // 2, 1 << 18))  # and within 256 Ki tokens: read, not held whole
    start = max(1, cut - reach)
    near = np.fromfile(stream_path, dtype=dtype, count=min(n - 1, cut + reach) - start,
                       offset=start * dtype.itemsize)
    ends = start + 1 + np.flatnonzero(near == eot)  # boundaries, each in [start + 1, n - 1]
    return int(ends[np.argmin(np.abs(ends - cut))]) if len(ends) else cut


def write_token_files(documents: Iterable[str], out_dir: str | Path, encoding, val_fraction: float,
                      workers: int | None = None, progress: Progress | None = None) -> dict:
    """Tokenize documents (end-of-text after each) into train.bin / val.bin / meta.json.

    The stream is written once in order; about the last `val_fraction` of it becomes val.bin,
    starting at a document's first token.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction: expected a number between 0 and 1, got {val_fraction}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise DataError(f"--workers: must be at least 1, got {workers}")
    out = Path(out_dir)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file there or above it, no permission, a read-only disk
        raise DataError(f"--out '{out}': cannot make that directory ({e.strerror or e}); choose another") from None
    if created:  # marked until done: a run killed outright leaves a directory the readers refuse, never an empty one
        atomic_write(out / PREPARING, b"tools/prepare_data.py is writing this directory\n")
    try:
        try:
            return _write_token_files(documents, out, encoding, val_fraction, workers, progress)
        except OSError as e:  # a full disk while writing (the error of a write names no file)
            raise DataError(f"--out '{out}': writing the token files failed ({e.strerror or e}); free space or "
                            f"choose another --out") from None
    except BaseException:
        if created:  # nothing of ours is worth keeping; a directory that was there keeps its old files
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write_token_files(documents: Iterable[str], out: Path, encoding, val_fraction: float, workers: int,
                       progress: Progress | None) -> dict:
    for stale in out.glob(".prepare-*"):  # a killed run's staging folder (as large as the corpus)
        shutil.rmtree(stale, ignore_errors=True)
    vocab = encoding.n_vocab
    dtype = token_dtype(vocab)
    n_docs = n_bytes = top = 0
    with tempfile.TemporaryDirectory(dir=out, prefix=".prepare-") as tmp:
        stream_path = Path(tmp) / "all.bin"
        with open(stream_path, "wb") as stream:
            for tokens, docs, size in _encoded_in_order(documents, encoding, workers):
                stream.write(tokens)
                n_docs += docs
                n_bytes += size
                top = max(top, int(np.frombuffer(tokens, dtype=dtype).max())) if tokens else top
                if progress:
                    progress.add(docs, size, len(tokens) // dtype.itemsize)
        if progress:
            progress.close()
        n = stream_path.stat().st_size // dtype.itemsize
        n_val = n - document_cut(stream_path, dtype, n, n - max(1, int(round(n * val_fraction))), encoding.eot_token)
        if n - n_val < 2:
            raise DataError(f"the input holds only {n} tokens: too little to split into train and val")
        if n_val < 2:
            raise DataError(f"--val-fraction {val_fraction}: of {n:,} tokens that holds out {n_val}; val.bin needs "
                            f"at least a window's worth: raise it")
        meta = {"format": "gptx-tokens-v1", "tokenizer": encoding.name, "vocab_size": vocab,
                "dtype": dtype.name, "eot_token": encoding.eot_token, "documents": n_docs, "text_bytes": n_bytes,
                "train_tokens": n - n_val, "val_tokens": n_val, "max_token": top}
        # The stream's tail is copied out as val.bin and the stream cut to become train.bin, so the
        # disk holds the corpus's tokens once, not twice.
        train_bytes = (n - n_val) * dtype.itemsize
        with open(stream_path, "r+b") as stream, open(Path(tmp) / "val.bin", "wb") as val:
            stream.seek(train_bytes)
            shutil.copyfileobj(stream, val, 1 << 20)
            val.flush()
            os.fsync(val.fileno())
            stream.truncate(train_bytes)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(stream_path, Path(tmp) / "train.bin")
        atomic_write(Path(tmp) / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
        # The three files move in one after another: the marker makes the moment in between visible.
        atomic_write(out / PREPARING, b"tools/prepare_data.py is writing this directory\n")
        for name in ("train.bin", "val.bin", META_FILE):
            os.replace(Path(tmp) / name, out / name)
        (out / PREPARING).unlink()
    return meta
