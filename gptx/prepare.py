"""Text -> token files (train.bin, val.bin, meta.json) at any corpus size.

Documents stream from .txt (one each), JSON lines (.jsonl, .jsonl.gz, .jsonl.zst: a text
field per line) and parquet (a text column) files, or directories of them. Batches of about
a megabyte of text are tokenized on `workers` processes and written in input order, with at
most a few batches per worker in flight, so memory stays flat whatever the corpus size.
Every output is staged in a temporary folder inside the output directory and moved in at
the end; while they are being moved a PREPARING marker is there, and a directory with it is
refused by the readers, so an interrupted run never leaves a mix of old and new files.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from gptx.atomic import atomic_write
from gptx.data import META_FILE, PREPARING, token_dtype
from gptx.errors import ConfigError, DataError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
BATCH_CHARS = 1 << 20
"""Text per tokenization task."""


def _kind(path: Path) -> str | None:
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if path.name.endswith(s)), None)


def _open_jsonl(path: Path, kind: str):
    if kind == ".jsonl.gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if kind == ".jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise ConfigError(f"'{path}': reading .zst needs zstandard: pip install -e \".[data]\"") from None
        # read_across_frames: files from pzstd or concatenated .zst hold several frames.
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True, read_across_frames=True)
        return io.TextIOWrapper(reader, encoding="utf-8")
    return open(path, encoding="utf-8")


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"'{path}': reading parquet needs pyarrow: pip install -e \".[data]\"") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise DataError(f"parquet file '{path}': cannot read it ({e})") from None
    columns = table.schema_arrow.names
    if field not in columns:
        raise DataError(f"parquet file '{path}': no column '{field}' (it has {', '.join(columns)}); "
                        f"pass --text-field")
    row = 0
    for batch in table.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise DataError(f"parquet file '{path}' row {row}: '{field}' is {type(text).__name__}, not text")
            yield text


def iter_documents(paths: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Documents from the files and directories of files named, in order (directories sorted)."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if _kind(f) and f.is_file())
            if not files:
                raise DataError(f"input directory '{path}': no {', '.join(SUFFIXES)} files in it")
            yield from iter_documents((str(f) for f in files), text_field)
            continue
        if not path.exists():
            raise DataError(f"input '{path}': no such file or directory")
        kind = _kind(path)
        if kind == ".txt":
            yield path.read_text(encoding="utf-8")
        elif kind == ".parquet":
            yield from _parquet_texts(path, text_field)
        elif kind is not None:
            with _open_jsonl(path, kind) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise DataError(f"'{path}' line {lineno}: not valid JSON") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise DataError(f"'{path}' line {lineno}: expected an object with a string "
                                        f"'{text_field}' field")
                    yield record[text_field]
        else:
            raise DataError(f"input '{path}': expected {', '.join(SUFFIXES)} files or directories of them")


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
    """(token bytes with end-of-text after each document, documents, UTF-8 bytes read)."""
    dtype = token_dtype(_encoding.n_vocab)
    eot = _encoding.eot_token
    out = bytearray()
    for ids in _encoding.encode_ordinary_batch(texts, num_threads=1):
        ids.append(eot)
        out += np.asarray(ids, dtype=dtype).tobytes()
    return bytes(out), len(texts), sum(len(t.encode("utf-8")) for t in texts)


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
    """Documents, MB read, MB/s and tokens on one self-updating stderr line, on a terminal only."""

    def __init__(self, stream=sys.stderr, every: float = 0.5):
        self.stream, self.every = stream, every
        self.live = hasattr(stream, "isatty") and stream.isatty()
        self.start = self.shown = time.perf_counter()
        self.documents = self.bytes = self.tokens = 0

    def add(self, documents: int, n_bytes: int, tokens: int) -> None:
        self.documents += documents
        self.bytes += n_bytes
        self.tokens += tokens
        now = time.perf_counter()
        if self.live and now - self.shown >= self.every:
            self.shown = now
            self.stream.write(f"\r{self.line()}")
            self.stream.flush()

    def line(self) -> str:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.documents:,} documents, {self.bytes / 1e6:,.1f} MB, {self.bytes / 1e6 / seconds:,.1f} MB/s, "
                f"{self.tokens:,} tokens")

    def close(self) -> None:
        if self.live:
            self.stream.write(f"\r{self.line()}\n")
            self.stream.flush()


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write_token_files(documents: Iterable[str], out_dir: str | Path, encoding, val_fraction: float,
                      workers: int | None = None, progress: Progress | None = None) -> dict:
    """Tokenize documents (end-of-text after each) into train.bin / val.bin / meta.json.

    The stream is written once in order; the last `val_fraction` of it becomes val.bin.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction: expected a number between 0 and 1, got {val_fraction}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise DataError(f"--workers: must be at least 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".prepare-*"):  # a killed run's staging folder (as large as the corpus)
        shutil.rmtree(stale, ignore_errors=True)
    vocab = encoding.n_vocab
    dtype = token_dtype(vocab)
    n_docs = n_bytes = 0
    with tempfile.TemporaryDirectory(dir=out, prefix=".prepare-") as tmp:
        stream_path = Path(tmp) / "all.bin"
        with open(stream_path, "wb") as stream:
            for tokens, docs, size in _encoded_in_order(documents, encoding, workers):
                stream.write(tokens)
                n_docs += docs
                n_bytes += size
                if progress:
                    progress.add(docs, size, len(tokens) // dtype.itemsize)
        if progress:
            progress.close()
        tokens = np.memmap(stream_path, dtype=dtype, mode="r") if stream_path.stat().st_size else np.zeros(0, dtype)
        n = len(tokens)
        n_val = max(1, int(round(n * val_fraction))) if n else 0
        if n - n_val < 2 or n_val < 2:
            raise DataError(f"the input holds only {n} tokens: too little to split into train and val")
        meta = {"format": "gptx-tokens-v1", "tokenizer": encoding.name, "vocab_size": vocab,
                "dtype": dtype.name, "eot_token": encoding.eot_token, "documents": n_docs, "text_bytes": n_bytes,
                "train_tokens": n - n_val, "val_tokens": n_val}
        for name, part in (("train", tokens[:n - n_val]), ("val", tokens[n - n_val:])):
            with open(Path(tmp) / f"{name}.bin", "wb") as f:
                for start in range(0, len(part), 1 << 24):
                    f.write(np.ascontiguousarray(part[start:start + (1 << 24)]).tobytes())
                f.flush()
                os.fsync(f.fileno())
        del tokens
        atomic_write(Path(tmp) / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
        # The three files move in one after another: the marker makes the moment in between visible.
        atomic_write(out / PREPARING, b"tools/prepare_data.py is writing this directory\n")
        for name in ("train.bin", "val.bin", META_FILE):
            os.replace(Path(tmp) / name, out / name)
        (out / PREPARING).unlink()
    return meta
