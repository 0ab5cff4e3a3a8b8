"""Token data: the GPT-2 tokenizer offline, text -> token files, and resumable batch windows.

On-disk format (the same as nanoGPT's): `train.bin` and `val.bin` are raw token ids,
uint16 (uint32 when the vocabulary does not fit), plus `meta.json` saying which and the
tokenizer's vocabulary size. A directory without meta.json is read as nanoGPT's: uint16
GPT-2 tokens, or a character-level set when its meta.pkl says so.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from gptx.atomic import atomic_write
from gptx.errors import DataError

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256
# tiktoken's r50k_base, which is GPT-2's BPE; openai-whisper ships it byte-identical.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
META_FILE = "meta.json"
SPLITS = ("train", "val")


def cache_dir() -> Path:
    return Path(os.environ.get("GPTX_CACHE", Path.home() / ".cache" / "gptx"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tiktoken_cache_path() -> Path:
    """Where tiktoken itself looks for r50k_base, so get_encoding('r50k_base') works offline too."""
    root = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") \
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(root) / hashlib.sha1(GPT2_RANKS_URL.encode()).hexdigest()


def _ranks_from_whisper_sdist(log) -> bytes | None:
    """Fetch the openai-whisper source distribution from the package index and take its copy."""
    with tempfile.TemporaryDirectory() as tmp:
        log("gptx: fetching the GPT-2 BPE ranks from the openai-whisper source distribution (package index)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "--dest", tmp, "openai-whisper"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("openai*whisper-*.tar.gz"))
        if result.returncode != 0 or not archives:
            log(f"gptx: pip download openai-whisper failed: {result.stderr.strip().splitlines()[-1:]}")
            return None
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(WHISPER_MEMBER):
                    return tar.extractfile(member).read()
    return None


def gpt2_ranks(bpe_file: str | None = None, log=lambda msg: print(msg, file=sys.stderr)) -> bytes:
    """The GPT-2 BPE rank file, hash-checked: from `bpe_file`, a cache, or the package index."""
    ours = cache_dir() / "gpt2.tiktoken"
    bpe_file = bpe_file or os.environ.get("GPTX_GPT2_BPE")
    if bpe_file:
        try:
            data = Path(bpe_file).read_bytes()
        except OSError as e:
            raise DataError(f"GPT-2 BPE file '{bpe_file}': cannot read it ({e.strerror})") from None
        if _sha256(data) != GPT2_RANKS_SHA256:
            raise DataError(f"GPT-2 BPE file '{bpe_file}': sha256 {_sha256(data)[:12]}... is not that of "
                            f"tiktoken's r50k_base ({GPT2_RANKS_SHA256[:12]}...)")
    else:
        data = None
        for candidate in (ours, _tiktoken_cache_path()):
            if candidate.exists() and _sha256(candidate.read_bytes()) == GPT2_RANKS_SHA256:
                data = candidate.read_bytes()
                break
        if data is None:
            data = _ranks_from_whisper_sdist(log)
            if data is None or _sha256(data) != GPT2_RANKS_SHA256:
                raise DataError(
                    "no GPT-2 BPE available: not cached, and fetching openai-whisper from the package index "
                    "failed or gave a different file; download r50k_base.tiktoken (or whisper's "
                    "assets/gpt2.tiktoken) and pass it with --bpe-file or GPTX_GPT2_BPE")
    for target in (ours, _tiktoken_cache_path()):
        if not target.exists() or target.read_bytes() != data:
            atomic_write(target, data)
    return data


def gpt2_mergeable_ranks(bpe_file: str | None = None) -> dict[bytes, int]:
    """GPT-2's BPE as tiktoken holds it: token bytes -> rank, which is also the token id."""
    ranks = {}
    for line in gpt2_ranks(bpe_file).splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def gpt2_encoding(bpe_file: str | None = None):
    """tiktoken's GPT-2 encoding, built from the offline rank file."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=gpt2_mergeable_ranks(bpe_file),
                             special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB_SIZE)


# ----------------------------------------------------------------------------------------
# Text -> token files

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def iter_documents(paths: Iterable[str]) -> Iterator[str]:
    """Documents from .txt files (one per file), .jsonl files (a `text` field per line), or directories of them."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file())
            if not files:
                raise DataError(f"input directory '{path}': no .txt or .jsonl files in it")
            yield from iter_documents(str(f) for f in files)
        elif not path.exists():
            raise DataError(f"input '{path}': no such file or directory")
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise DataError(f"'{path}' line {lineno}: not valid JSON") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise DataError(f"'{path}' line {lineno}: expected an object with a string 'text' field")
                    yield record["text"]
        elif path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
        else:
            raise DataError(f"input '{path}': expected a .txt or .jsonl file or a directory of them")


def write_token_files(documents: Iterable[str], out_dir: str | Path, encoding, val_fraction: float,
                      batch_docs: int = 256) -> dict:
    """Tokenize documents (end-of-text after each) into train.bin / val.bin / meta.json.

    The stream is written once in order; the last `val_fraction` of it becomes val.bin.
    Files appear atomically: a crash leaves no half-written split behind.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction: expected a number between 0 and 1, got {val_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = encoding.n_vocab
    dtype = token_dtype(vocab)
    eot = encoding.eot_token
    n_docs = 0
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        stream_path = Path(tmp) / "all.bin"
        with open(stream_path, "wb") as stream:
            batch: list[str] = []

            def flush():
                for ids in encoding.encode_ordinary_batch(batch):
                    ids.append(eot)
                    stream.write(np.asarray(ids, dtype=dtype).tobytes())
                batch.clear()

            for doc in documents:
                batch.append(doc)
                n_docs += 1
                if len(batch) >= batch_docs:
                    flush()
            flush()
        tokens = np.memmap(stream_path, dtype=dtype, mode="r") if stream_path.stat().st_size else np.zeros(0, dtype)
        n = len(tokens)
        n_val = max(1, int(round(n * val_fraction))) if n else 0
        if n - n_val < 2 or n_val < 2:
            raise DataError(f"the input holds only {n} tokens: too little to split into train and val")
        meta = {"format": "gptx-tokens-v1", "tokenizer": encoding.name, "vocab_size": vocab,
                "dtype": dtype.name, "eot_token": eot, "documents": n_docs,
                "train_tokens": n - n_val, "val_tokens": n_val}
        for name, part in (("train", tokens[:n - n_val]), ("val", tokens[n - n_val:])):
            part_path = Path(tmp) / f"{name}.bin"
            with open(part_path, "wb") as f:
                for start in range(0, len(part), 1 << 24):
                    f.write(np.ascontiguousarray(part[start:start + (1 << 24)]).tobytes())
            os.replace(part_path, out / f"{name}.bin")
        del tokens
        atomic_write(out / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def default_corpus_texts() -> list[str]:
    """English text every Python install carries: the documentation topics of pydoc_data."""
    from pydoc_data.topics import topics
    return [topics[key] for key in sorted(topics)]


def default_data_dir(log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The embedded corpus, tokenized once with GPT-2 BPE and cached."""
    texts = default_corpus_texts()
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:12]
    out = cache_dir() / f"pydoc-{digest}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process per machine tokenizes; the others wait for it
        if not (out / META_FILE).exists():
            log(f"gptx: tokenizing the embedded Python documentation corpus into {out}")
            write_token_files(texts, out, gpt2_encoding(), val_fraction=0.1)
    return out


# ----------------------------------------------------------------------------------------
# Reading token files

NANOGPT_META = "meta.pkl"


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: a data directory is not trusted code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_meta(data_dir: Path) -> dict:
    """The data directory's meta.json; for nanoGPT's layouts (no meta.json), what they imply:
    a character-level set's meta.pkl gives its vocabulary, no meta at all means GPT-2 tokens."""
    meta_path = data_dir / META_FILE
    if not meta_path.exists():
        pkl = data_dir / NANOGPT_META
        if pkl.exists():
            try:
                with open(pkl, "rb") as f:
                    saved = _PlainDataUnpickler(f).load()
                vocab = int(saved["vocab_size"])
            except Exception:
                raise DataError(f"data file '{pkl}': not a nanoGPT meta.pkl (a dict with 'vocab_size')") from None
            return {"vocab_size": vocab, "dtype": "uint16", "tokenizer": f"nanoGPT {NANOGPT_META}"}
        return {"vocab_size": GPT2_VOCAB_SIZE, "dtype": "uint16", "tokenizer": "gpt2 (no meta.json: nanoGPT's layout)"}
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, OSError):
        raise DataError(f"data file '{meta_path}': not valid JSON") from None
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"data file '{meta_path}': 'dtype' must be uint16 or uint32, got {meta.get('dtype')!r}")
    if not isinstance(meta.get("vocab_size"), int) or meta["vocab_size"] < 1:
        raise DataError(f"data file '{meta_path}': 'vocab_size' must be a positive integer, "
                        f"got {meta.get('vocab_size')!r}")
    return meta


def check_vocabulary(meta: dict, vocab_size: int, where: str) -> None:
    """The data must come from the model's tokenizer: the same vocabulary size.

    A model wider than its tokenizer would train rows no token uses (and a table sized
    for another tokenizer means the ids mean other things); pad_vocab_to_multiple is how
    gptx pads the table for fast matmuls while the loss keeps the tokenizer's size.
    """
    data_vocab = meta["vocab_size"]
    if data_vocab == vocab_size:
        return
    tokenizer = f" ({meta['tokenizer']})" if meta.get("tokenizer") else ""
    hint = (f"set model.vocab_size {data_vocab} (pad_vocab_to_multiple pads the table for fast matmuls)"
            if data_vocab < vocab_size else f"set model.vocab_size {data_vocab} or tokenize with the model's tokenizer")
    raise DataError(f"{where}: tokenized with a {data_vocab}-token vocabulary{tokenizer}, but model.vocab_size is "
                    f"{vocab_size}; {hint}")


def open_tokens(data_dir: str | Path, split: str) -> np.memmap:
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.bin"
    if not path.exists():
        raise DataError(f"data directory '{data_dir}': missing {split}.bin (prepare it with tools/prepare_data.py)")
    dtype = np.dtype(read_meta(data_dir)["dtype"])
    if path.stat().st_size % dtype.itemsize:
        raise DataError(f"data file '{path}': size is not a multiple of {dtype.itemsize} bytes ({dtype.name})")
    if path.stat().st_size == 0:
        raise DataError(f"data file '{path}': empty")
    return np.memmap(path, dtype=dtype, mode="r")


def check_data(data_dir: str | Path, vocab_size: int, seq_len: int) -> None:
    """Every check that needs only the files: presence, format, length, token range."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data '{data_dir}': not a directory (expected train.bin, val.bin and meta.json)")
    check_vocabulary(read_meta(data_dir), vocab_size, f"data directory '{data_dir}'")
    for split in SPLITS:
        tokens = open_tokens(data_dir, split)
        if len(tokens) < seq_len + 1:
            raise DataError(f"data file '{data_dir / (split + '.bin')}': {len(tokens)} tokens, fewer than one "
                            f"window of seq_len + 1 = {seq_len + 1}")
        top = 0
        for start in range(0, len(tokens), 1 << 26):
            top = max(top, int(tokens[start:start + (1 << 26)].max()))
        if top >= vocab_size:
            raise DataError(f"data file '{data_dir / (split + '.bin')}': token id {top} is outside the model's "
                            f"vocabulary (model.vocab_size {vocab_size})")


class TokenWindows:
    """Deterministic, resumable (inputs, labels) micro-batches for one data-parallel rank.

    The split is cut into non-overlapping windows of seq_len + 1 tokens. Samples are
    numbered globally: sample g is window perm_e[g mod N] of epoch e = g div N, where perm_e
    is a permutation seeded by (seed, e), so each epoch visits every window exactly once
    and epochs wrap without dropping or repeating. Micro-batch m of rank r holds samples
    m * (micro_batch * dp_size) + r * micro_batch + [0, micro_batch): together the ranks'
    micro-batches of one iteration cover one contiguous range of samples, so the global
    batch is the same whatever the data-parallel size. Resume by passing the count of
    samples consumed so far.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, start_sample: int = 0, shuffle: bool = True):
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.n_windows = (len(tokens) - 1) // seq_len
        assert self.n_windows >= 1, "check_data guarantees at least one window"
        stride = micro_batch * dp_size
        if start_sample % stride:
            raise DataError(f"data position {start_sample} samples is not a multiple of micro-batch x data-parallel "
                            f"size ({stride}); resume with the batch layout the checkpoint was saved with")
        self.next_micro = start_sample // stride
        self._epoch, self._perm = -1, None

    def _window(self, sample: int) -> int:
        epoch, idx = divmod(sample, self.n_windows)
        if not self.shuffle:
            return idx
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._epoch = epoch
        return int(self._perm[idx])

    def sample_ids(self, micro: int) -> list[int]:
        first = micro * self.micro_batch * self.dp_size + self.dp_rank * self.micro_batch
        return list(range(first, first + self.micro_batch))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for sample in self.sample_ids(self.next_micro):
            start = self._window(sample) * self.seq_len
            rows.append(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))
        self.next_micro += 1
        batch = torch.from_numpy(np.stack(rows))  # (B, T + 1)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # inputs, labels: (B, T) each
