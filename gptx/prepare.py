"""Text -> token files (train.bin, val.bin, meta.json) at any corpus size.

Documents stream from .txt (one each), JSON lines (.jsonl, .jsonl.gz, .jsonl.zst: a text
field per line) and parquet (a text column) files, or directories of them. Batches of about
a megabyte of text are tokenized on `workers` processes and written in input order, with at
most a few batches per worker in flight, so memory stays flat whatever the corpus size.
Every output is staged in a temporary folder inside the output directory and moved in at
the end; while they are being moved a PREPARING marker is there, and a directory with it is
refused by the readers, so an interrupted run never leaves a mix of old and new files. A run
that fails removes the output directory it created (and marks it PREPARING until it is done,
in case it is killed), so no empty or half-written --out is left behind.

Text that is not valid UTF-8 (web corpora hold Latin-1 pages, stray binary files, JSON with
lone surrogate escapes) is decoded with U+FFFD for each bad byte sequence, counted per file
and reported (`InputReport`): one bad page must not stop a day-long run. `strict_utf8` stops
instead at the first one, naming the file and byte offset. A file that looks binary (a NUL
byte in its first KiB) is skipped with a warning, as tokenizing an executable or an image
only adds noise.
"""
from __future__ import annotations

import codecs
import gzip
import io
import json
import zlib
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
    """The decompressed bytes of a JSON-lines file: decoding is ours (see `_decode`), so a bad
    byte is replaced or reported with its offset rather than failing inside a text wrapper."""
    if kind == ".jsonl.gz":
        return gzip.open(path, "rb")
    if kind == ".jsonl.zst":
        try:
            import zstandard
        except ImportError:
            raise ConfigError(f"'{path}': reading .zst needs zstandard: pip install -e \".[data]\"") from None
        return io.BufferedReader(_ZstdFrames(path, zstandard), buffer_size=1 << 20)
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every frame of a .zst file (pzstd and `cat a.zst b.zst` write
    several), raising at the end if the last frame is incomplete: zstandard's stream reader
    returns a cut-short file's bytes as if they were all of it."""

    def __init__(self, path: Path, zstandard):
        self.file = open(path, "rb")
        self.decompressor = zstandard.ZstdDecompressor()
        self.frame = self.decompressor.decompressobj()
        self.pending, self.pos = b"", 0  # decompressed bytes; pending[pos:] are not yet read
        self.mid_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.pos == len(self.pending):
            self.pending, self.pos = b"", 0
            chunk = self.file.read(1 << 20)
            if not chunk:
                if self.mid_frame:
                    raise EOFError("the last zstd frame ends early")
                return 0
            pieces = []  # joined once: adding each frame's bytes to the last would copy them per frame
            while chunk:
                pieces.append(self.frame.decompress(chunk))
                self.mid_frame = not self.frame.eof
                chunk = self.frame.unused_data if self.frame.eof else b""
                if self.frame.eof:  # the next frame starts in what is left
                    self.frame = self.decompressor.decompressobj()
            self.pending = b"".join(pieces)
        n = min(len(buffer), len(self.pending) - self.pos)
        buffer[:n] = memoryview(self.pending)[self.pos:self.pos + n]  # no copy of the rest per read
        self.pos += n
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


BINARY_SNIFF = 1024
"""A NUL byte in this many leading bytes marks a file as binary (text never holds one)."""


class InputReport:
    """What reading the inputs met: U+FFFD replacements per file, files skipped as binary.

    `warn` gets each skipped file at once (one line); `summary()` gives the lines for the end.
    """

    def __init__(self, strict_utf8: bool = False, warn=None):
        self.strict_utf8 = strict_utf8
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.replacements: dict[str, int] = {}
        self.skipped: list[str] = []

    def skip(self, path: Path, why: str) -> None:
        self.skipped.append(str(path))
        self.warn(f"warning: skipped '{path}': {why}")

    def replaced(self, path: Path, count: int) -> None:
        if count:
            self.replacements[str(path)] = self.replacements.get(str(path), 0) + count

    def summary(self, worst: int = 3) -> list[str]:
        """The lines for the end of the run: replacements (the worst few files), skipped files."""
        lines = []
        if self.replacements:
            ranked = sorted(self.replacements.items(), key=lambda kv: (-kv[1], kv[0]))
            shown = ", ".join(f"'{name}' {count:,}" for name, count in ranked[:worst])
            more = f" and {len(ranked) - worst:,} more" if len(ranked) > worst else ""
            lines.append(f"warning: {len(ranked):,} input file(s) are not valid UTF-8: "
                         f"{sum(self.replacements.values()):,} bad byte sequence(s) became U+FFFD ({shown}{more}); "
                         f"--strict-utf8 stops at the first instead")
        if self.skipped:
            lines.append(f"warning: skipped {len(self.skipped):,} file(s) that look binary (named above)")
        return lines


class _Replacements:
    """The count the `gptx-count-replace` error handler keeps (decoding runs in the reading process only)."""
    count = 0


def _count_and_replace(error: UnicodeDecodeError):
    # Registered once as a codec error handler: the decoder calls it per bad sequence from C,
    # so valid text decodes at full speed and bad text costs one call per replacement.
    _Replacements.count += 1
    return "\ufffd", error.end


codecs.register_error("gptx-count-replace", _count_and_replace)


def _decode(data: bytes, path: Path, report: InputReport, where: str = "", base: int = 0) -> str:
    """UTF-8 bytes -> text under the report's policy. `base` is the offset of `data` in the file
    (its decompressed bytes for .gz/.zst) and `where` a line number, for the strict message."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if report.strict_utf8:
            raise DataError(f"'{path}'{where}: not valid UTF-8 at byte offset {base + e.start:,} "
                            f"(0x{data[e.start]:02x}); without --strict-utf8 bad bytes become U+FFFD and are "
                            f"counted") from None
    _Replacements.count = 0
    text = data.decode("utf-8", "gptx-count-replace")
    report.replaced(path, _Replacements.count)
    return text


def _valid_text(text: str, path: Path, report: InputReport, where: str) -> str:
    """JSON's \\ud800-style escapes can give lone surrogates, which no UTF-8 holds: replace them
    (counted) as a bad byte is, or stop under --strict-utf8."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as e:
        if report.strict_utf8:
            raise DataError(f"'{path}'{where}: a lone surrogate \\u{ord(text[e.start]):04x} is not valid "
                            f"UTF-8; without --strict-utf8 it becomes U+FFFD and is counted") from None
    report.replaced(path, sum(1 for c in text if 0xD800 <= ord(c) <= 0xDFFF))
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def _looks_binary(head: bytes) -> bool:
    """A NUL byte early on, in bytes that are not UTF-8: valid text that holds a NUL is still text."""
    if b"\0" not in head[:BINARY_SNIFF]:
        return False
    try:
        head[:BINARY_SNIFF].decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < BINARY_SNIFF - 3  # not only a character cut at the sniff's end
    return False


def _parquet_texts(path: Path, field: str, report: InputReport) -> Iterator[str]:
    try:
        import pyarrow as pa
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
    batches = table.iter_batches(columns=[field], batch_size=4096)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged or cut-short file fails part way, in pyarrow's error types
            raise DataError(f"parquet file '{path}': cannot read it after row {row:,} ({e})") from None
        if batch is None:
            return
        column = batch.column(0)
        try:
            values = column.to_pylist()
        except UnicodeDecodeError:  # parquet does not validate its strings: read this batch as bytes
            binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
            values = column.cast(binary).to_pylist()
        for text in values:
            row += 1
            if isinstance(text, bytes):  # a binary column, or strings that are not UTF-8
                text = _decode(text, path, report, f" row {row:,}")
            if not isinstance(text, str):
                raise DataError(f"parquet file '{path}' row {row}: '{field}' is {type(text).__name__}, not text")
            yield text


def _jsonl_texts(path: Path, kind: str, field: str, report: InputReport) -> Iterator[str]:
    offset = 0  # of the line in the (decompressed) file, for the strict message
    try:
        opened = _open_jsonl(path, kind)
    except OSError as e:
        raise DataError(f"input '{path}': cannot read it ({_describe(e)})") from None
    try:
        with opened as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and _looks_binary(raw[:BINARY_SNIFF]):
                    report.skip(path, "it looks binary (a NUL byte in its first KiB), not JSON lines")
                    return
                line = _decode(raw, path, report, f" line {lineno:,}", offset)
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"'{path}' line {lineno}: not valid JSON") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise DataError(f"'{path}' line {lineno}: expected an object with a string '{field}' field")
                # Lone surrogates come only from \u escapes: other lines skip the check's extra encode.
                text = record[field]
                yield _valid_text(text, path, report, f" line {lineno:,}") if b"\\u" in raw else text
    except (OSError, EOFError, zlib.error) as e:  # gzip's BadGzipFile is an OSError; a cut-short one, EOFError
        raise DataError(f"'{path}': cannot read it after {offset:,} bytes ({_describe(e)}): damaged or cut short") \
            from None
    except Exception as e:
        if type(e).__module__.startswith("zstandard") or type(e).__name__ == "ZstdError":
            raise DataError(f"'{path}': cannot read it after {offset:,} bytes ({e}): damaged or cut short") from None
        raise


def _describe(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _txt_text(path: Path, report: InputReport) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"input '{path}': cannot read it ({e.strerror})") from None
    if _looks_binary(data):
        report.skip(path, "it looks binary (a NUL byte in its first KiB, in bytes that are not UTF-8), not text")
        return None
    # Line ends as Path.read_text() gave them before the bytes were decoded here: \r\n and \r
    # become \n, so a file edited on Windows tokenizes as it always has.
    return _decode(data, path, report).replace("\r\n", "\n").replace("\r", "\n")


def iter_documents(paths: Iterable[str], text_field: str = "text", report: InputReport | None = None) -> Iterator[str]:
    """Documents from the files and directories of files named, in order (directories sorted).

    `report` sets the UTF-8 policy and collects what was replaced or skipped (default:
    replace, and warn on stderr about skipped files)."""
    report = report if report is not None else InputReport()
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if _kind(f) and f.is_file())
            if not files:
                raise DataError(f"input directory '{path}': no {', '.join(SUFFIXES)} files in it")
            yield from iter_documents((str(f) for f in files), text_field, report)
            continue
        if not path.exists():
            raise DataError(f"input '{path}': no such file or directory")
        kind = _kind(path)
        if kind == ".txt":
            text = _txt_text(path, report)
            if text is not None:
                yield text
        elif kind == ".parquet":
            yield from _parquet_texts(path, text_field, report)
        elif kind is not None:
            yield from _jsonl_texts(path, kind, text_field, report)
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

    def __init__(self, stream=None, every: float = 0.5):
        self.stream, self.every = stream or sys.stderr, every  # looked up now: a redirected stderr is honoured
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
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

    def message(self, line: str) -> None:
        """A line of its own (a warning) while the progress line is live: clear it first."""
        self.stream.write(("\r\033[K" if self.live else "") + line + "\n")
        self.stream.flush()
        self.shown = 0.0  # redraw at the next add

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
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if created:  # marked until done: a run killed outright leaves a directory the readers refuse, never an empty one
        atomic_write(out / PREPARING, b"tools/prepare_data.py is writing this directory\n")
    try:
        return _write_token_files(documents, out, encoding, val_fraction, workers, progress)
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
