"""Documents from text files: .txt (one each, read in pieces that tokenize as the whole), JSON
lines (.jsonl, .jsonl.gz, .jsonl.zst: a text field per line) and parquet (a text column) files,
or directories of them, in a stable order.

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
import sys
import zlib
from pathlib import Path
from typing import Iterable, Iterator

from gptx.errors import ConfigError, DataError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


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

    def __init__(self, strict_utf8: bool = False, warn=None,
                 strict_hint: str = "without --strict-utf8 bad bytes become U+FFFD and are counted"):
        self.strict_utf8 = strict_utf8
        self.strict_hint = strict_hint  # the end of the strict message: what the command offers instead
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
                            f"(0x{data[e.start]:02x}); {report.strict_hint}") from None
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
                offset += len(raw)
                if lineno == 1:  # a byte-order mark (Windows editors write one) is not part of the JSON
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                line = _decode(raw, path, report, f" line {lineno:,}", offset - len(raw))
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


class DocumentPiece(str):
    """Text of a document that goes on in the next item: no end-of-text follows it."""


TXT_PIECE_BYTES = 1 << 22
"""A .txt file is one document, read and tokenized in pieces of at least this many bytes."""

_ASCII_VISIBLE = range(0x21, 0x7F)


def _piece_end(data: bytearray, start: int, stop: int) -> int | None:
    """The last place to end a piece of `data` after a newline at [start, stop) without
    changing its tokens.

    A newline between two visible ASCII characters (\r\n counts as one) always ends a pre-token
    of the GPT-2, cl100k and o200k patterns, and no pre-token reaches across it: the newline is a
    pre-token alone or ends one, and one that starts with a visible character never begins with a
    newline. BPE merges stay inside pre-tokens, so the pieces' tokens are the whole text's. A cut
    there never splits a UTF-8 sequence either."""
    i = data.rfind(b"\n", start, stop)
    while i >= 2:
        before = data[i - 2] if data[i - 1] == 0x0D else data[i - 1]
        if i + 1 < len(data) and data[i + 1] in _ASCII_VISIBLE and before in _ASCII_VISIBLE:
            return i + 1
        i = data.rfind(b"\n", start, i)
    return None


def _txt_pieces(path: Path, report: InputReport) -> Iterator[str]:
    """A .txt file as one document in pieces (DocumentPiece, then a str for its end), so a corpus
    of one multi-GB file is read and tokenized in parallel, in little memory. A file of one
    block is one piece."""
    try:
        with open(path, "rb") as f:
            if _looks_binary(f.read(BINARY_SNIFF)):
                report.skip(path, "it looks binary (a NUL byte in its first KiB, in bytes that are not UTF-8), "
                                  "not text")
                return
            f.seek(0)
            held = bytearray(f.read(TXT_PIECE_BYTES))  # read, not yet given out
            # A byte-order mark says how the file is encoded; it is not text of the document.
            offset = 3 if held.startswith(codecs.BOM_UTF8) else 0  # where `held` starts in the file
            del held[:offset]
            searched = 0  # held[:searched] has no place to cut
            while block := f.read(TXT_PIECE_BYTES):
                # A piece ends in what was held before this block, so the text after it is never
                # empty; only bytes not searched yet are, so a file with no place to cut is read once.
                before = len(held)
                held += block
                end = _piece_end(held, searched, before)
                if end is None:
                    searched = before
                    continue
                yield DocumentPiece(_txt_text(held[:end], path, report, offset))
                del held[:end]
                offset, searched = offset + end, before - end
            yield _txt_text(held, path, report, offset)
    except OSError as e:
        raise DataError(f"input '{path}': cannot read it ({e.strerror})") from None


def _txt_text(data: bytes, path: Path, report: InputReport, offset: int) -> str:
    # Line ends as Path.read_text() gave them before the bytes were decoded here: \r\n and \r
    # become \n, so a file edited on Windows tokenizes as it always has.
    return _decode(data, path, report, base=offset).replace("\r\n", "\n").replace("\r", "\n")


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
            yield from _txt_pieces(path, report)
        elif kind == ".parquet":
            yield from _parquet_texts(path, text_field, report)
        elif kind is not None:
            yield from _jsonl_texts(path, kind, text_field, report)
        else:
            raise DataError(f"input '{path}': expected {', '.join(SUFFIXES)} files or directories of them")
