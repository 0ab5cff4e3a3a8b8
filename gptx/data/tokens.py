"""Token data: the GPT-2 tokenizer offline, the token files, and resumable batch windows.

On-disk format (the same as nanoGPT's): `train.bin` and `val.bin` are raw token ids,
uint16 (uint32 when the vocabulary does not fit), plus `meta.json` saying which and the
tokenizer's vocabulary size. A directory without meta.json is read as nanoGPT's: uint16
GPT-2 tokens, or a character-level set when its meta.pkl says so.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gptx.atomic import atomic_write
from gptx.data.blend import Blend
from gptx.errors import DataError

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256
GPT2_PADDED_MAX = 51200
"""The largest table read as GPT-2 BPE: its 50,257 tokens padded by hand to a multiple of up to
1,024 (nanoGPT's 50,304). The rows past 50,257 are no token: nothing samples or decodes them."""
# tiktoken's r50k_base, which is GPT-2's BPE; openai-whisper ships it byte-identical.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
META_FILE = "meta.json"
PREPARING = "PREPARING"
"""Present in a data directory only while tools/prepare_data.py moves its files in."""
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


def _whisper_download_command(dest: str) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", "--dest", dest,
            "openai-whisper"]


def _ranks_from_whisper_sdist(log, progress_every: float = 15.0) -> bytes | None:
    """Fetch the openai-whisper source distribution from the package index and take its copy.

    The download is large and pip is quiet, so the user is told why a speech package, where
    the file will stay, and every `progress_every` seconds that it is still going.
    """
    with tempfile.TemporaryDirectory() as tmp:
        log(f"gptx: fetching GPT-2's BPE from the openai-whisper sdist on PyPI (it ships the vocabulary files); "
            f"once, cached in {cache_dir()}")
        start = time.monotonic()
        with subprocess.Popen(_whisper_download_command(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) as proc:
            while True:
                try:
                    _, stderr = proc.communicate(timeout=progress_every)
                    break
                except subprocess.TimeoutExpired:  # retrying communicate() loses no output
                    log(f"gptx: still fetching openai-whisper ({time.monotonic() - start:.0f} s)")
        archives = sorted(Path(tmp).glob("openai*whisper-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            log(f"gptx: pip download openai-whisper failed: {stderr.strip().splitlines()[-1:]}")
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
            try:
                cached = candidate.read_bytes() if candidate.exists() else None
            except OSError:  # another user's cache, a damaged disk: try the next source
                continue
            if cached is not None and _sha256(cached) == GPT2_RANKS_SHA256:
                data = cached
                break
        if data is None:
            data = _ranks_from_whisper_sdist(log)
            if data is None or _sha256(data) != GPT2_RANKS_SHA256:
                raise DataError(
                    "no GPT-2 BPE available: not cached, and fetching openai-whisper from the package index "
                    "failed or gave a different file; download r50k_base.tiktoken (or whisper's "
                    "assets/gpt2.tiktoken) and pass it with --bpe-file or GPTX_GPT2_BPE")
    for target in (ours, _tiktoken_cache_path()):  # caches only: a failure here costs a later lookup, no more
        try:
            if not target.exists() or target.read_bytes() != data:
                atomic_write(target, data)
        except OSError as e:
            log(f"gptx: could not cache the GPT-2 BPE in '{target}' ({e.strerror or e}); going on without it")
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
# The embedded corpus (text -> token files is gptx/data/prepare.py)

def reads_gpt2_bpe(vocab_size: int) -> bool:
    """A model table of GPT-2's tokens, or of those padded by hand (see GPT2_PADDED_MAX)."""
    return GPT2_VOCAB_SIZE <= vocab_size <= GPT2_PADDED_MAX


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


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
    if (data_dir / PREPARING).exists():
        raise DataError(f"data directory '{data_dir}': tools/prepare_data.py was interrupted while writing it "
                        f"(a {PREPARING} file is there); run it again")
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
            if vocab > 2 ** 16:  # nanoGPT writes uint16 only
                raise DataError(f"data file '{pkl}': a {vocab}-token vocabulary cannot be nanoGPT's uint16 tokens; "
                                f"write a meta.json with 'dtype': 'uint32' and 'vocab_size' {vocab}")
            return {"vocab_size": vocab, "dtype": "uint16", "tokenizer": f"nanoGPT {NANOGPT_META}"}
        if not any((data_dir / f"{split}.bin").exists() for split in SPLITS):
            raise DataError(f"data directory '{data_dir}': no train.bin, val.bin or {META_FILE}; prepare it with "
                            f"tools/prepare_data.py")
        return {"vocab_size": GPT2_VOCAB_SIZE, "dtype": "uint16", "tokenizer": "gpt2 (no meta.json: nanoGPT's layout)"}
    try:
        meta = json.loads(meta_path.read_bytes())
    except (ValueError, OSError):  # ValueError: JSONDecodeError and bytes that are not UTF-8
        raise DataError(f"data file '{meta_path}': not valid JSON") from None
    if not isinstance(meta, dict):
        raise DataError(f"data file '{meta_path}': expected a JSON object")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"data file '{meta_path}': 'dtype' must be uint16 or uint32, got {meta.get('dtype')!r}")
    if not isinstance(meta.get("vocab_size"), int) or isinstance(meta["vocab_size"], bool) or meta["vocab_size"] < 1:
        raise DataError(f"data file '{meta_path}': 'vocab_size' must be a positive integer, "
                        f"got {meta.get('vocab_size')!r}")
    if meta["dtype"] == "uint16" and meta["vocab_size"] > 2 ** 16:
        raise DataError(f"data file '{meta_path}': 'dtype' uint16 cannot hold the ids of a {meta['vocab_size']}-token "
                        f"vocabulary; a tokenizer that large writes uint32 (say so in meta.json)")
    for split in SPLITS:  # optional (meta.json written by hand may leave them out); open_tokens checks them
        count = meta.get(f"{split}_tokens")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
            raise DataError(f"data file '{meta_path}': '{split}_tokens' must be a whole number, got {count!r}")
    return meta


def check_vocabulary(meta: dict, vocab_size: int, where: str, allow_smaller: bool = False) -> None:
    """The data must come from the model's tokenizer: the same vocabulary size.

    A model wider than its tokenizer would train rows no token uses (and a table sized
    for another tokenizer means the ids mean other things); pad_vocab_to_multiple is how
    gptx pads the table for fast matmuls while the loss keeps the tokenizer's size.
    `allow_smaller` is for a model that already exists (a resume, an evaluation): one
    trained by hand-padding, e.g. 50304 rows for GPT-2 data, must stay usable.
    """
    data_vocab = meta["vocab_size"]
    if meta["dtype"] == "uint16" and vocab_size > 2 ** 16 and data_vocab < vocab_size:
        # Read as uint16 (a folder without meta.json is), ids of a tokenizer this large would be
        # cut in halves and still pass every range check.
        tokenizer = meta.get("tokenizer", "meta.json")
        raise DataError(f"{where}: read as uint16 tokens of a {data_vocab}-token vocabulary ({tokenizer}), "
                        f"but model.vocab_size is {vocab_size}; a tokenizer over 65536 tokens writes uint32: give "
                        f"the directory a meta.json with 'dtype': 'uint32' and its 'vocab_size'")
    if data_vocab == vocab_size or (allow_smaller and data_vocab < vocab_size):
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
    if not path.is_file():
        raise DataError(f"data file '{path}': not a file; prepare the data again")
    meta = read_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(f"data file '{path}': {size:,} bytes is not a whole number of {dtype.name} tokens "
                        f"({dtype.itemsize} bytes each, as meta.json says): the file was cut short or is not token "
                        f"data; prepare the data again")
    if size == 0:
        raise DataError(f"data file '{path}': empty")
    # A file cut short (a copy that ran out of space, a truncated download) or swapped for
    # another split still reads as tokens; only the count meta.json recorded tells.
    expected = meta.get(f"{split}_tokens")
    if expected is not None and size // dtype.itemsize != expected:
        other = np.dtype(np.uint32 if dtype.itemsize == 2 else np.uint16)
        why = (f"it holds {other.name} tokens where meta.json says {dtype.name}" if size == expected * other.itemsize
               else "the file was cut short or replaced" if size // dtype.itemsize < expected
               else "the file was replaced or appended to")
        raise DataError(f"data file '{path}' holds {size // dtype.itemsize:,} tokens where meta.json says "
                        f"{expected:,}: {why}; prepare the data again")
    return np.memmap(path, dtype=dtype, mode="r")


def check_data(data_dir: str | Path, vocab_size: int, seq_len: int, allow_smaller_vocabulary: bool = False) -> None:
    """Every check that needs only the files: presence, format, length, token range."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data '{data_dir}': not a directory (expected train.bin, val.bin and meta.json)")
    meta = read_meta(data_dir)
    check_vocabulary(meta, vocab_size, f"data directory '{data_dir}'", allow_smaller_vocabulary)
    for split in SPLITS:
        tokens = open_tokens(data_dir, split)
        if len(tokens) < seq_len + 1:
            raise DataError(f"data file '{data_dir / (split + '.bin')}': {len(tokens)} tokens, fewer than one "
                            f"window of seq_len + 1 = {seq_len + 1}")
        if meta["dtype"] == "uint16" and meta.get(f"{split}_tokens") is None and looks_like_uint32(tokens):
            raise DataError(f"data file '{data_dir / (split + '.bin')}': read as uint16 tokens, every second one is "
                            f"0: it holds uint32 tokens; say so in a meta.json beside it ('dtype': 'uint32' and "
                            f"the tokenizer's 'vocab_size')")
        # Recorded by tools/prepare_data.py with the counts open_tokens checked: no pass over the corpus at
        # every launch. Files written by hand or by other tools are read to their last token.
        top = meta.get("max_token") if meta.get(f"{split}_tokens") is not None else None
        if not isinstance(top, int) or isinstance(top, bool) or top < 0:
            top = 0
            for start in range(0, len(tokens), 1 << 26):
                top = max(top, int(tokens[start:start + (1 << 26)].max()))
        if top >= vocab_size:
            raise DataError(f"data file '{data_dir / (split + '.bin')}': token id {top} is outside the model's "
                            f"vocabulary (model.vocab_size {vocab_size})")


def looks_like_uint32(tokens: np.ndarray) -> bool:
    """uint32 ids below 65,536 read as uint16 are id, 0, id, 0, ...: in range, so no other check
    sees them. Real uint16 data (0 is GPT-2's "!") never has a thousand zeros at every odd place."""
    head = np.asarray(tokens[:1 << 16])
    return len(tokens) % 2 == 0 and len(head) >= 2000 and not head[1::2].any() and head[0::2].any()


class TokenWindows:
    """Deterministic, resumable (inputs, labels) micro-batches for one data-parallel rank.

    Each source's split is cut into non-overlapping windows of seq_len + 1 tokens. Samples
    are numbered globally; a mixture's `Blend` (gptx/data/blend.py) says which source sample g
    comes from and that it is the source's i-th; one source's i-th sample is window
    perm_e[i mod N] of its epoch e = i div N, where perm_e is a permutation seeded by
    (seed, e) (and the source's number after the first), so each epoch visits every window
    exactly once and epochs wrap without dropping or repeating. Micro-batch m of rank r
    holds samples m * (micro_batch * dp_size) + r * micro_batch + [0, micro_batch):
    together the ranks' micro-batches of one iteration cover one contiguous range of
    samples, so the global batch is the same whatever the data-parallel size. Resume by
    passing the count of samples consumed so far.
    """

    def __init__(self, tokens: np.ndarray | list[np.ndarray], seq_len: int, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, start_sample: int = 0, shuffle: bool = True,
                 weights: list[float] | None = None):
        self.sources = tokens if isinstance(tokens, list) else [tokens]
        self.seq_len = seq_len
        self.length = seq_len
        """Tokens each sample trains on: the first `length` of its window (a sequence-length warmup)."""
        self.micro_batch = micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.blend = Blend(weights or [1.0] * len(self.sources), seed)
        self.n_windows_per_source = [(len(t) - 1) // seq_len for t in self.sources]
        self.n_windows = self.n_windows_per_source[0]
        assert min(self.n_windows_per_source) >= 1, "check_data guarantees at least one window"
        stride = micro_batch * dp_size
        if start_sample % stride:
            raise DataError(f"data position {start_sample} samples is not a multiple of micro-batch x data-parallel "
                            f"size ({stride}); resume with the batch layout the checkpoint was saved with")
        self.next_micro = start_sample // stride
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def locate(self, sample: int) -> tuple[int, int]:
        """Global sample -> (source, window in that source's split)."""
        source, index = self.blend.locate(sample)
        epoch, idx = divmod(index, self.n_windows_per_source[source])
        if not self.shuffle:
            return source, idx
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            key = [self.seed, epoch] + ([source] if source else [])  # one source: the order it always had
            n = self.n_windows_per_source[source]
            # numpy's permutation(n) shuffled an int64 arange; the same shuffle of 4-byte
            # indices gives the same order in half the memory (a billion windows: 4 GB, not 8).
            order = np.arange(n, dtype=np.uint32 if n <= 2 ** 32 else np.int64)
            np.random.default_rng(key).shuffle(order)
            cached = (epoch, order)
            self._perms[source] = cached
        return source, int(cached[1][idx])

    def sample_ids(self, micro: int) -> list[int]:
        first = micro * self.micro_batch * self.dp_size + self.dp_rank * self.micro_batch
        return list(range(first, first + self.micro_batch))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for sample in self.sample_ids(self.next_micro):
            source, window = self.locate(sample)
            start = window * self.seq_len
            rows.append(np.asarray(self.sources[source][start:start + self.length + 1], dtype=np.int64))
        self.next_micro += 1
        batch = torch.from_numpy(np.stack(rows))  # (B, T + 1)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # inputs, labels: (B, T) each
