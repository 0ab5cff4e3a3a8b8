"""Loss, perplexity and bits per byte of a model on a text file or a token file."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gptx.data.documents import InputReport, iter_documents
from gptx.data.tokens import (GPT2_EOT, GPT2_VOCAB_SIZE, check_vocabulary, gpt2_encoding, open_tokens, read_meta,
                              reads_gpt2_bpe)
from gptx.errors import CheckpointError, DataError
from gptx.model.gpt import GPT
from gptx.training.checkpoint_files import LATEST, META, TAG_PREFIX


def check_checkpoint_path(path: str | Path) -> None:
    """--load names something to evaluate: a run directory or a checkpoint folder.

    checkpoint.find_latest's message for a folder without checkpoints is written for training
    ("to resume from"); here one line says what was given instead and how evaluate.py is called.
    """
    path = Path(path)
    if not path.is_dir() or (path / META).exists() or (path / LATEST).exists() or any(path.glob(f"{TAG_PREFIX}*")):
        return  # missing, or a checkpoint or run: load_plain_model says the rest
    if (path / "meta.json").exists() or any((path / f"{split}.bin").exists() for split in ("train", "val")):
        raise CheckpointError(f"--load '{path}': a data directory (train.bin, val.bin, meta.json), not a model; "
                              f"give --load a run directory or checkpoint folder and this one as --data: "
                              f"tools/evaluate.py --load RUN --data {path}")
    raise CheckpointError(f"--load '{path}': no checkpoint to evaluate in it (no {TAG_PREFIX}* folders, no {META}); "
                          f"give a run directory or a checkpoint folder")


def load_eval_tokens(path: str | Path, vocab_size: int) -> tuple[np.ndarray, int | None]:
    """(token ids, UTF-8 byte count or None) from a .txt file (one document), a .jsonl file (a
    `text` field per line, each document followed by end-of-text as in training), a .bin split,
    or a data directory (its val.bin)."""
    path = Path(path)
    if path.is_dir():
        meta = read_meta(path)
        check_vocabulary(meta, vocab_size, f"--data '{path}'", allow_smaller=True)
        return open_tokens(path, "val"), _byte_count(open_tokens(path, "val"), meta)
    if not path.exists():
        raise DataError(f"--data '{path}': no such file or directory")
    if path.suffix == ".bin":
        meta = read_meta(path.parent)
        check_vocabulary(meta, vocab_size, f"--data '{path}'", allow_smaller=True)
        # A split of a prepared directory is checked against its meta.json (a file cut short is refused).
        tokens = open_tokens(path.parent, path.stem) if path.stem in ("train", "val") else _token_file(path, meta)
        return tokens, _byte_count(tokens, meta)
    if path.suffix not in (".txt", ".jsonl"):
        raise DataError(f"--data '{path}': expected a .txt, .jsonl or .bin file or a data directory")
    if not reads_gpt2_bpe(vocab_size):
        raise DataError(f"--data '{path}': text is tokenized with GPT-2 BPE ({GPT2_VOCAB_SIZE} tokens), but the "
                        f"model's vocabulary has {vocab_size}; pass token files made with its own tokenizer")
    enc = gpt2_encoding()
    # A measurement on text with U+FFFD in it would mislead: one line instead.
    strict = InputReport(strict_utf8=True, strict_hint="convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    if path.suffix == ".txt":
        text = "".join(iter_documents([str(path)], report=strict))
        if not text:
            raise DataError(f"--data '{path}': no text in it")
        return np.asarray(enc.encode_ordinary(text), dtype=np.int64), len(text.encode("utf-8"))
    docs = list(iter_documents([str(path)], report=strict))
    if not docs:
        raise DataError(f"--data '{path}': no documents in it")
    ids = [t for doc in enc.encode_ordinary_batch(docs) for t in doc + [GPT2_EOT]]
    return np.asarray(ids, dtype=np.int64), sum(len(doc.encode("utf-8")) for doc in docs)


def _token_file(path: Path, meta: dict) -> np.ndarray:
    """Another .bin of a prepared directory: its tokens, in the directory's dtype."""
    dtype = np.dtype(meta["dtype"])
    size = path.stat().st_size
    if size < dtype.itemsize or size % dtype.itemsize:
        raise DataError(f"--data '{path}': {size} bytes is not a whole number of {dtype.name} tokens (at least "
                        f"one): empty, cut short or not a token file")
    return np.memmap(path, dtype=dtype, mode="r")


def _byte_count(tokens: np.ndarray, meta: dict) -> int | None:
    """The bytes of the text the tokens stand for. End-of-text separates documents and stands for
    no text, as in the .jsonl path's count, so a corpus measures the same either way."""
    if meta.get("vocab_size") != GPT2_VOCAB_SIZE or not meta.get("tokenizer", "gpt2").startswith("gpt2"):
        return None
    ids = np.asarray(tokens, dtype=np.int64)
    top = int(ids.max()) if len(ids) else 0
    if top >= GPT2_VOCAB_SIZE:  # no GPT-2 token: its bytes are unknown (and the model check would refuse it later)
        raise DataError(f"token id {top} is not a GPT-2 token (0..{GPT2_VOCAB_SIZE - 1}), though meta.json says "
                        f"GPT-2 BPE: the file is damaged or not what meta.json says; prepare the data again")
    return len(gpt2_encoding().decode_bytes(ids[ids != GPT2_EOT].tolist()))


@torch.no_grad()
def evaluate_tokens(model: GPT, tokens: np.ndarray, seq_len: int, batch_size: int = 8, progress=None) -> dict:
    """Token-weighted loss over the whole stream in consecutive windows of seq_len predictions.

    `progress(windows done, windows in all)` is called after each batch.
    """
    cfg = model.cfg
    if seq_len < 1:
        raise DataError(f"--seq-len: must be at least 1, got {seq_len}")
    if batch_size < 1:
        raise DataError(f"--batch-size: must be at least 1, got {batch_size}")
    if cfg.position_embedding == "learned" and seq_len > cfg.seq_len:
        raise DataError(f"--seq-len {seq_len}: this model's learned positions end at {cfg.seq_len}; "
                        f"only alibi, rotary or none positions evaluate longer contexts")
    if len(tokens) < 2:
        raise DataError("evaluation data holds fewer than 2 tokens")
    if int(np.max(tokens)) >= cfg.vocab_size:
        raise DataError(f"evaluation data has token id {int(np.max(tokens))}, outside the vocabulary ({cfg.vocab_size})")
    model.eval()
    device = next(model.parameters()).device
    full = (len(tokens) - 1) // seq_len
    windows = [(w * seq_len, seq_len) for w in range(full)]
    if len(tokens) - 1 - full * seq_len > 0:  # the tail, shorter than a window
        windows.append((full * seq_len, len(tokens) - 1 - full * seq_len))
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        group = [w for w in windows[i:i + batch_size] if w[1] == windows[i][1]]
        rest = windows[i + len(group):i + batch_size]
        for chunk in (group, rest):
            if not chunk:
                continue
            rows = np.stack([np.asarray(tokens[s:s + n + 1], dtype=np.int64) for s, n in chunk])
            batch = torch.from_numpy(rows).to(device)  # (B, n + 1)
            logits = model(batch[:, :-1])  # (B, n, V)
            total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
        if progress is not None:
            progress(min(i + batch_size, len(windows)), len(windows))
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 80)), "tokens": count, "loss_sum_nats": total}


def evaluate_contexts(model: GPT, tokens: np.ndarray, n_bytes: int | None, lengths: list[int], batch_size: int = 8,
                      progress=lambda seq_len: None) -> list[dict]:
    """evaluate_tokens at each context length, with bits per byte. With several lengths, one
    beyond a learned position table becomes a row saying why; any other problem is an error."""
    cfg = model.cfg
    rows = []
    for seq_len in lengths:
        if len(lengths) > 1 and cfg.position_embedding == "learned" and seq_len > cfg.seq_len:
            rows.append({"seq_len": seq_len, "refused": f"--seq-len {seq_len}: this model's learned positions end "
                                                       f"at {cfg.seq_len}"})
            continue
        row = evaluate_tokens(model, tokens, seq_len, batch_size, progress=progress(seq_len))
        row["bits_per_byte"] = row["loss_sum_nats"] / math.log(2) / n_bytes if n_bytes else None
        rows.append({"seq_len": seq_len, **row})
    return rows


def context_table(rows: list[dict], cfg) -> str:
    """One line per context length: loss, perplexity, bits per byte (or why it was refused)."""
    lines = [f"context   tokens        loss   perplexity  bits/byte   (trained at {cfg.seq_len}, "
             f"{cfg.position_embedding} positions)"]
    for r in rows:
        if "refused" in r:
            lines.append(f"{r['seq_len']:7d}   refused: {r['refused']}")
            continue
        bpb = f"{r['bits_per_byte']:9.4f}" if r["bits_per_byte"] is not None else "        -"
        lines.append(f"{r['seq_len']:7d}   {r['tokens']:9,d}   {r['loss']:7.4f}   {r['perplexity']:10.2f}  {bpb}")
    return "\n".join(lines)
