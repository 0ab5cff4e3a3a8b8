"""Weighted mixtures of prepared data directories, and which source each sample comes from.

`--data` takes a directory or a YAML file listing sources:

    sources:
      - {path: owt, weight: 1.0}        # relative to the YAML file
      - {path: books, weight: 0.5}

Weights are shares of training samples (normalised). Sample g of the run comes from the
source `Blend.locate(g)` (gptx/data/blend.py) names: samples are dealt in blocks of PERIOD, each block holding
every source's quota (its share of PERIOD, rounded by largest remainders) in an order
shuffled by (seed, block). So every block has the exact proportions, any sample's source and
its index within that source are computed in O(PERIOD) from (seed, g) alone, with no index
to build or store, and each source's samples are taken in order without gaps: the layout
(stages, data-parallel ranks) and a resume from a sample count change nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from gptx.data.blend import PERIOD, quotas
from gptx.data.tokens import check_data, open_tokens, read_meta
from gptx.errors import DataError

REPEAT_WARNING = 4.0
"""Epochs of one source over a run above which the start-up log warns."""


@dataclass(frozen=True)
class Source:
    path: Path
    weight: float
    """Normalised share of the training samples."""


def read_mixture(path: str | Path) -> list[Source]:
    """A mixture YAML file -> its sources, weights normalised; one-line errors."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"mixture file '{path}': cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:  # a binary file given as --data
        raise DataError(f"mixture file '{path}': not UTF-8 text (byte offset {e.start})") from None
    except yaml.YAMLError:
        raise DataError(f"mixture file '{path}': not valid YAML") from None
    entries = spec.get("sources") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"mixture file '{path}': expected 'sources:', a list of {{path: DIR, weight: NUMBER}}")
    sources = []
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or set(entry) - {"path", "weight"} or "path" not in entry:
            raise DataError(f"mixture file '{path}': source {n} must be {{path: DIR, weight: NUMBER}}, got {entry!r}")
        weight = entry.get("weight", 1.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            weight = float("nan")
        if isinstance(entry.get("weight"), bool) or not weight > 0 or weight == float("inf"):
            raise DataError(f"mixture file '{path}': source {n} ({entry['path']}): weight must be a positive number, "
                            f"got {entry.get('weight')!r}")
        source_dir = Path(str(entry["path"]))
        source_dir = source_dir if source_dir.is_absolute() else path.parent / source_dir
        if not source_dir.is_dir():
            raise DataError(f"mixture file '{path}': source {n}: '{source_dir}' is not a directory")
        sources.append(Source(source_dir, weight))
    total = sum(s.weight for s in sources)
    if not math.isfinite(total):  # weights like 1e308 overflow their sum: by the largest first
        top = max(s.weight for s in sources)
        sources = [Source(s.path, s.weight / top) for s in sources]
        total = sum(s.weight for s in sources)
    sources = [Source(s.path, s.weight / total) for s in sources]
    for s, quota in zip(sources, quotas([s.weight for s in sources])):
        if quota == 0:
            raise DataError(f"mixture file '{path}': source '{s.path}' has {s.weight:.2g} of the total weight, "
                            f"which rounds to no sample in every {PERIOD:,}: it would never be sampled; give it at "
                            f"least 1/{PERIOD:,} of the total")
    return sources


def sources_for(data: str | Path) -> list[Source]:
    """--data as sources: a mixture YAML file, or one directory."""
    data = Path(data)
    if data.suffix in (".yaml", ".yml"):
        return read_mixture(data)
    return [Source(data, 1.0)]


def check_sources(sources: list[Source], vocab_size: int, seq_len: int, allow_smaller_vocabulary: bool = False) -> None:
    """Every source is valid data for this model, and all come from one tokenizer."""
    vocabularies = {str(s.path): read_meta(s.path)["vocab_size"] for s in sources}
    if len(set(vocabularies.values())) > 1:
        raise DataError("mixture sources come from different tokenizers: "
                        + ", ".join(f"'{p}' has {v} tokens" for p, v in vocabularies.items()))
    for s in sources:
        check_data(s.path, vocab_size, seq_len, allow_smaller_vocabulary)


def windows_per_epoch(tokens: np.ndarray, seq_len: int) -> int:
    return (len(tokens) - 1) // seq_len


def describe(sources: list[Source], seq_len: int, run_samples: int) -> list[dict]:
    """Per source: path, normalised weight, train windows, and the epochs a run of `run_samples`
    samples goes through it (GPT*'s relative epochs)."""
    rows = []
    for s in sources:
        windows = windows_per_epoch(open_tokens(s.path, "train"), seq_len)
        rows.append({"path": str(s.path), "weight": s.weight, "windows": windows,
                     "epochs": run_samples * s.weight / windows})
    return rows


def as_record(sources: list[Source]) -> list[dict]:
    """What a checkpoint records of its data: each source's directory, share and train tokens (the
    window order of an epoch follows from their count, so a resume can tell that it changed)."""
    return [{"path": str(s.path.resolve()), "weight": s.weight, "train_tokens": len(open_tokens(s.path, "train"))}
            for s in sources]


def token_count_changes(saved: list[dict], now: list[dict]) -> list[str]:
    """One line per source whose train split holds another number of tokens than the checkpoint's
    run read (prepared again, or appended to): the windows after the resume are not the ones
    the uninterrupted run would have read."""
    before = {r["path"]: r.get("train_tokens") for r in saved}
    return [f"data '{r['path']}': train.bin holds {r['train_tokens']:,} tokens, {before[r['path']]:,} when the "
            f"checkpoint was saved; the rest of the epoch reads its windows in a new order, so some already "
            f"trained on come again and some are skipped"
            for r in now if before.get(r["path"]) not in (None, r["train_tokens"])]

