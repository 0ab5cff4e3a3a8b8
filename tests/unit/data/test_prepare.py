"""tools/prepare_data.py: every input format round trip, workers, interruption, bad input."""
import gzip
import json

import numpy as np
import pytest

from gptx.cli.prepare_data import run_prepare_data
from gptx.data.documents import iter_documents
from gptx.data.prepare import write_token_files
from gptx.data.tokens import check_data, gpt2_encoding, open_tokens
from gptx.errors import DataError

DOCS = ["The quick brown fox.", "Jumps over the lazy dog.\nTwice!", "A third document, with ünïcode.",
        "Fourth: 🙂 and 日本語.", ""]


@pytest.fixture(scope="module")
def enc():
    return gpt2_encoding()


def stream_of(out) -> list[int]:
    return np.concatenate([open_tokens(out, "train"), open_tokens(out, "val")]).tolist()


def write_inputs(folder, kind: str, field: str = "text"):
    """DOCS in one file of the given kind (a .txt input is one file per document)."""
    folder.mkdir(parents=True)
    lines = "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(DOCS))
    if kind == ".txt":
        for i, d in enumerate(DOCS):
            (folder / f"{i}.txt").write_text(d, encoding="utf-8")
    elif kind == ".jsonl":
        (folder / "docs.jsonl").write_text(lines, encoding="utf-8")
    elif kind == ".jsonl.gz":
        with gzip.open(folder / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write(lines)
    elif kind == ".jsonl.zst":
        zstandard = pytest.importorskip("zstandard")
        (folder / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    elif kind == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        pq.write_table(pa.table({field: DOCS, "id": list(range(len(DOCS)))}), folder / "docs.parquet", row_group_size=2)
    return folder


@pytest.mark.parametrize("kind", [".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"])
@pytest.mark.parametrize("workers", [1, 2])
def test_every_format_round_trips_in_order_with_any_number_of_workers(tmp_path, enc, kind, workers):
    folder = write_inputs(tmp_path / "in", kind)
    meta = write_token_files(iter_documents([str(folder)]), tmp_path / "out", enc, 0.3, workers=workers)
    stream = stream_of(tmp_path / "out")
    assert enc.decode(stream) == "".join(d + "<|endoftext|>" for d in DOCS)
    assert meta["documents"] == len(DOCS) and meta["text_bytes"] == sum(len(d.encode()) for d in DOCS)
    # The 30% cut (13 of 44 tokens) moves back one token, to the start of the fourth document.
    assert len(open_tokens(tmp_path / "out", "val")) == meta["val_tokens"] == len(enc.encode_ordinary(DOCS[-2])) + 2
    assert enc.decode(open_tokens(tmp_path / "out", "val").tolist()) == DOCS[-2] + "<|endoftext|>" * 2


def test_the_split_falls_between_documents_where_there_is_one_and_a_tiny_val_names_the_fraction(tmp_path, enc):
    docs = [f"Document number {i} " + "is quite long. " * (i % 7) for i in range(60)]
    for fraction in (0.05, 0.3, 0.77):
        out = tmp_path / f"out{fraction}"
        meta = write_token_files(docs, out, enc, fraction, workers=1)
        train, val = open_tokens(out, "train"), open_tokens(out, "val")
        assert train[-1] == enc.eot_token and enc.decode(val.tolist()).startswith("Document number")
        assert abs(meta["val_tokens"] / (len(train) + len(val)) - fraction) < 0.05  # a document's length off at most
    whole = "one document with no end in sight " * 200  # nowhere to cut between documents: cut inside it
    meta = write_token_files([whole], tmp_path / "one", enc, 0.1, workers=1)
    assert meta["val_tokens"] == round(len(enc.encode_ordinary(whole) + [enc.eot_token]) * 0.1)
    # A preface, then a book: before, the whole book went to val.bin (the boundary before it was the last one).
    meta = write_token_files(["A short preface.", whole], tmp_path / "book", enc, 0.1, workers=1)
    assert meta["val_tokens"] == round((meta["train_tokens"] + meta["val_tokens"]) * 0.1)
    with pytest.raises(DataError, match="--val-fraction 0.0001: of 44 tokens that holds out 1; val.bin needs at "
                                        "least a window's worth: raise it"):
        write_token_files(DOCS, tmp_path / "tiny", enc, 0.0001, workers=1)


def test_many_batches_on_two_workers_give_the_one_worker_stream(tmp_path, enc, monkeypatch):
    import gptx.data.prepare
    monkeypatch.setattr(gptx.data.prepare, "BATCH_CHARS", 64)  # dozens of tasks in flight
    docs = [f"Document {i}: " + "word " * (i % 17) for i in range(400)]
    one = write_token_files(docs, tmp_path / "one", enc, 0.1, workers=1)
    two = write_token_files(docs, tmp_path / "two", enc, 0.1, workers=2)
    assert one == two and stream_of(tmp_path / "one") == stream_of(tmp_path / "two")


def test_a_parquet_text_field_and_a_missing_column(tmp_path, enc, capsys):
    folder = write_inputs(tmp_path / "in", ".parquet", field="content")
    assert run_prepare_data([str(folder), "--out", str(tmp_path / "out"), "--text-field", "content",
                             "--val-fraction", "0.2", "--workers", "1"]) == 0
    assert "MB/s, 1 worker(s))" in capsys.readouterr().out
    assert enc.decode(stream_of(tmp_path / "out")) == "".join(d + "<|endoftext|>" for d in DOCS)
    assert run_prepare_data([str(folder), "--out", str(tmp_path / "out2")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: parquet file '{folder / 'docs.parquet'}': no column 'text' "
                                               f"(it has content, id); pass --text-field")


def test_an_interrupted_prepare_leaves_the_old_outputs_or_a_refused_directory(tmp_path, enc, monkeypatch):
    out = tmp_path / "out"
    write_token_files(DOCS, out, enc, 0.2, workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted():
        yield "A new first document."
        raise KeyboardInterrupt  # Ctrl-C while tokenizing
    with pytest.raises(KeyboardInterrupt):
        write_token_files(interrupted(), out, enc, 0.2, workers=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, no temporary left
    # Killed while the new files move in: the marker stays and readers refuse the directory.
    import os
    real_replace = os.replace

    def dies_after_train_bin(src, dst):
        if str(dst) == str(out / "val.bin"):
            raise SystemExit("killed")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", dies_after_train_bin)
    with pytest.raises(SystemExit):
        write_token_files(["Another corpus entirely."] * 3, out, enc, 0.2, workers=1)
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(DataError, match="prepare_data.py was interrupted while writing it"):
        check_data(out, 50257, 4)
    write_token_files(DOCS, out, enc, 0.2, workers=1)  # running it again repairs it
    check_data(out, 50257, 4)


def test_large_vocabularies_use_uint32(tmp_path):
    class BigVocab:
        name, n_vocab, eot_token = "big", 100_000, 99_999

        def encode_ordinary_batch(self, texts, num_threads=1):
            return [[70_000 + len(t), 5] for t in texts]
    meta = write_token_files(["ab", "abc", "abcd"], tmp_path, BigVocab(), val_fraction=0.3, workers=1)
    assert meta["dtype"] == "uint32"
    tokens = np.concatenate([open_tokens(tmp_path, "train"), open_tokens(tmp_path, "val")]).tolist()
    assert tokens == [70_002, 5, 99_999, 70_003, 5, 99_999, 70_004, 5, 99_999]


@pytest.mark.parametrize("content,needle", [
    ('{"txt": "no text field"}\n', "line 1: expected an object with a string 'text' field"),
    ('{"text": "ok"}\n{broken\n', "line 2: not valid JSON"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, content, needle):
    (tmp_path / "x.jsonl").write_text(content)
    assert run_prepare_data([str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: '{tmp_path / 'x.jsonl'}' {needle}"
    assert not (tmp_path / "out" / "train.bin").exists() and not list((tmp_path / "out").glob(".prepare-*"))
    (tmp_path / "y.csv").write_text("a,b\n")
    assert run_prepare_data([str(tmp_path / "y.csv"), "--out", str(tmp_path / "out")]) == 2
    assert "expected .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet files" in capsys.readouterr().err


def test_an_out_that_cannot_be_a_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("some text\n")
    (tmp_path / "a_file").write_text("not a directory\n")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        assert run_prepare_data([str(tmp_path / "x.txt"), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --out '{out}': cannot make that directory (") and len(err.splitlines()) == 1, err


def test_a_zst_file_of_several_frames_is_read_to_its_end(tmp_path, enc):
    zstandard = pytest.importorskip("zstandard")
    frames = [zstandard.ZstdCompressor().compress((json.dumps({"text": d}) + "\n").encode()) for d in DOCS]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl.zst").write_bytes(b"".join(frames))  # as pzstd or cat a.zst b.zst writes
    assert list(iter_documents([str(tmp_path / "in")])) == DOCS


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path, enc):
    stale = tmp_path / "out" / ".prepare-abc123"
    stale.mkdir(parents=True)
    (stale / "all.bin").write_bytes(b"\0" * 1000)
    write_token_files(DOCS, tmp_path / "out", enc, 0.2, workers=1)
    assert not stale.exists()


# ---- input that is not UTF-8 (issue 26 item 2)

LATIN1 = "Crème brûlée, déjà vu, naïve façade.\n".encode("latin-1")


def corpus_with_bad_files(folder):
    """A folder as real corpora come: good text, a Latin-1 page, an executable saved as .txt."""
    folder.mkdir(parents=True)
    (folder / "a_good.txt").write_text("Plain text that is fine. " * 40, encoding="utf-8")
    (folder / "b_latin1.txt").write_bytes(LATIN1)
    (folder / "c_program.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    return folder


def test_text_that_is_not_utf8_is_replaced_counted_and_reported_and_binary_files_skipped(tmp_path, enc, capsys):
    folder = corpus_with_bad_files(tmp_path / "in")
    assert run_prepare_data([str(folder), "--out", str(tmp_path / "out"), "--val-fraction", "0.1",
                             "--workers", "2"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"warning: skipped '{folder / 'c_program.txt'}': it looks binary (a NUL byte in its first KiB, in " \
           f"bytes that are not UTF-8), not text" in err
    bad = sum(b > 127 for b in LATIN1)  # each accented letter is one byte of its own in Latin-1
    assert (f"warning: 1 input file(s) are not valid UTF-8: {bad} bad byte sequence(s) became U+FFFD "
            f"('{folder / 'b_latin1.txt'}' {bad}); --strict-utf8 stops at the first instead") in err
    text = enc.decode(stream_of(tmp_path / "out"))
    assert text == ("Plain text that is fine. " * 40 + "<|endoftext|>"
                    + LATIN1.decode("utf-8", "replace") + "<|endoftext|>")


def test_strict_utf8_stops_at_the_first_bad_byte_naming_file_and_offset_and_leaves_no_out(tmp_path, capsys):
    folder = corpus_with_bad_files(tmp_path / "in")
    assert run_prepare_data([str(folder), "--out", str(tmp_path / "out"), "--strict-utf8", "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: '{folder / 'b_latin1.txt'}': not valid UTF-8 at byte offset 2 (0xe8); without --strict-utf8 "
        f"bad bytes become U+FFFD and are counted")
    assert not (tmp_path / "out").exists()  # a failed run leaves no empty --out behind


@pytest.mark.parametrize("kind", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"])
def test_every_format_replaces_bad_utf8_or_names_its_place_under_strict(tmp_path, enc, kind):
    from gptx.data.documents import InputReport
    good = "An ordinary first document. " * 10
    raw = [good.encode(), b"caf\xe9 au lait", b"lone surrogate: \\ud800 here"]
    folder = tmp_path / "in"
    folder.mkdir()
    if kind == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq
        texts = pa.array([raw[0], raw[1]], type=pa.binary()).view(pa.string())  # parquet does not validate strings
        pq.write_table(pa.table({"text": texts}), folder / "docs.parquet")
        where = "row 2"
    else:
        body = b"".join(b'{"text": "' + r + b'"}\n' for r in raw)
        if kind == ".jsonl.gz":
            body = gzip.compress(body)
        elif kind == ".jsonl.zst":
            body = pytest.importorskip("zstandard").ZstdCompressor().compress(body)
        (folder / f"docs{kind}").write_bytes(body)
        where = "line 2"
    path = next(folder.iterdir())
    report = InputReport()
    docs = list(iter_documents([str(folder)], report=report))
    assert docs[:2] == [good, "caf\ufffd au lait"]
    expected = 1 if kind == ".parquet" else 2  # the bad byte, and in JSON the lone surrogate escape
    assert report.replacements == {str(path): expected}
    if kind != ".parquet":
        assert docs[2] == "lone surrogate: \ufffd here"
    write_token_files(docs, tmp_path / "out", enc, 0.2, workers=2)  # the workers take the repaired text
    with pytest.raises(DataError, match=rf"^'{path}' {where}: not valid UTF-8 at byte offset "):
        list(iter_documents([str(folder)], report=InputReport(strict_utf8=True)))
    if kind != ".parquet":  # the offset counts the (decompressed) bytes before it
        offset = len(b'{"text": "' + raw[0] + b'"}\n' + b'{"text": "caf')
        with pytest.raises(DataError, match=rf"offset {offset:,} \(0xe9\)"):
            list(iter_documents([str(folder)], report=InputReport(strict_utf8=True)))


@pytest.mark.parametrize("kind", [".jsonl.gz", ".jsonl.zst", ".parquet"])
def test_a_damaged_compressed_or_parquet_file_is_one_line_naming_it(tmp_path, capsys, kind):
    folder = write_inputs(tmp_path / "in", kind)
    path = next(folder.iterdir())
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])  # a download cut short
    assert run_prepare_data([str(folder), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"'{path}'" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_failure_keeps_an_existing_out_as_it_was(tmp_path, enc, capsys):
    out = tmp_path / "out"
    write_token_files(DOCS, out, enc, 0.2, workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "bad.txt").write_bytes(LATIN1)
    assert run_prepare_data([str(tmp_path / "bad.txt"), "--out", str(out), "--strict-utf8"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_new_out_is_marked_while_it_is_written(tmp_path, enc):
    out = tmp_path / "new" / "out"
    seen = []

    def docs():
        seen.append(sorted(p.name for p in out.iterdir()))  # while reading the first document
        yield from DOCS
    write_token_files(docs(), out, enc, 0.2, workers=1)
    assert "PREPARING" in seen[0]  # a run killed outright leaves a directory readers refuse, not an empty one
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_valid_text_reads_as_read_text_read_it_crlf_and_nul_included(tmp_path):
    # Decoding moved from Path.read_text() into gptx: valid UTF-8 must give the same documents as
    # before (universal newlines: \r\n and \r become \n), and a NUL in valid text is text.
    crlf = tmp_path / "windows.txt"
    crlf.write_bytes("first line\r\nsecond \u00e9\rthird\n".encode("utf-8"))
    nul = tmp_path / "nul.txt"
    nul.write_bytes("a\0b valid text\n".encode("utf-8"))
    for path in (crlf, nul):
        assert list(iter_documents([str(path)])) == [path.read_text(encoding="utf-8")]


def test_a_zst_of_many_frames_reads_whole(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    lines = [json.dumps({"text": f"document {i}"}) + "\n" for i in range(20000)]
    path = tmp_path / "frames.jsonl.zst"
    compressor = zstandard.ZstdCompressor()
    path.write_bytes(b"".join(compressor.compress(line.encode()) for line in lines))  # one frame a line
    assert list(iter_documents([str(path)])) == [f"document {i}" for i in range(20000)]


# ---- a .txt file is one document, read and tokenized in pieces

TRICKY = ["word", " word", "\n", "\n\n", "\r\n", "\r", " \n", "  ", "'s", "'ll", "é", "日本", "\u00a0", "123",
          "4567", ".", "!?", "(x)", "\t", "🙂", "<|endoftext|>", "don't", "A", "z\n"]


@pytest.mark.parametrize("seed", range(4))
def test_a_txt_file_read_in_pieces_tokenizes_as_the_whole_text(tmp_path, enc, monkeypatch, seed):
    import gptx.data.documents
    monkeypatch.setattr(gptx.data.documents, "TXT_PIECE_BYTES", 16)  # a cut wherever one is allowed
    rng = np.random.default_rng(seed)
    text = "".join(TRICKY[i] for i in rng.integers(0, len(TRICKY), 3000))
    path = tmp_path / "in.txt"
    path.write_bytes(text.encode("utf-8"))
    pieces = list(iter_documents([str(path)]))
    assert len(pieces) > 50 and "".join(pieces) == path.read_text(encoding="utf-8")
    meta = write_token_files(iter_documents([str(path)]), tmp_path / "out", enc, 0.1, workers=2)
    whole = enc.encode_ordinary(path.read_text(encoding="utf-8")) + [enc.eot_token]
    assert stream_of(tmp_path / "out") == whole
    assert meta["documents"] == 1 and meta["text_bytes"] == len(path.read_text(encoding="utf-8").encode("utf-8"))
    assert meta["max_token"] == max(whole)


def test_a_large_txt_file_is_never_held_whole(tmp_path, enc, monkeypatch):
    import tracemalloc

    import gptx.data.documents
    import gptx.data.prepare
    monkeypatch.setattr(gptx.data.documents, "TXT_PIECE_BYTES", 1 << 16)
    monkeypatch.setattr(gptx.data.prepare, "BATCH_CHARS", 1 << 16)
    path = tmp_path / "big.txt"
    line = "Once upon a time there was a little fox who liked to read.\n"
    path.write_text(line * (4_000_000 // len(line)), encoding="utf-8")
    tracemalloc.start()
    try:
        meta = write_token_files(iter_documents([str(path)]), tmp_path / "out", enc, 0.01, workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert meta["text_bytes"] == path.stat().st_size
    # Read whole, the file's bytes alone are its size (and its tokens as Python ints ten times that).
    assert peak < path.stat().st_size, peak


def test_a_prepared_directory_records_its_largest_token_and_the_launch_trusts_it(tmp_path, enc):
    out = tmp_path / "out"
    meta = write_token_files(DOCS * 20, out, enc, 0.2, workers=1)
    assert meta["max_token"] == max(stream_of(out))
    check_data(out, 50257, 4)
    recorded = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**recorded, "max_token": 60000}))
    with pytest.raises(DataError, match="token id 60000 is outside"):
        check_data(out, 50257, 4)


def test_a_byte_order_mark_is_not_text(tmp_path):
    # Windows editors start UTF-8 files with one: before, a .jsonl file's first line was "not valid
    # JSON" and a .txt document began with U+FEFF's tokens.
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello there")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    assert list(iter_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])) == ["hello there", "first",
                                                                                         "second"]


def test_ctrl_c_is_one_line_and_leaves_no_output(tmp_path, capsys, monkeypatch):
    import gptx.data.documents

    def interrupted(*args, **kwargs):
        yield "a first document"
        raise KeyboardInterrupt  # what Ctrl-C raises wherever the main thread is
    monkeypatch.setattr(gptx.data.documents, "iter_documents", interrupted)
    (tmp_path / "in.txt").write_text("text")
    assert run_prepare_data([str(tmp_path / "in.txt"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"  # before: a KeyboardInterrupt traceback
    assert not (tmp_path / "out").exists()
