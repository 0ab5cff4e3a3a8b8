"""EleutherAI's lm-evaluation-harness on any gptx checkpoint: the `gptx` model of its registry.

Importing this module registers the model; `tools/lm_eval_harness.py` is lm-eval's own command line
with it imported (lm-eval 0.4 has no plugin entry point for models, so its stock `lm_eval`
command cannot find a model another package defines). Needs the `eval` extra.

The checkpoint (any stage count, precision or variant) is loaded into the single-device
model. Text goes through GPT-2 BPE, so the model must have GPT-2's vocabulary. A context
longer than the model's window keeps its last tokens, as lm-eval's own models do; the
window is `seq_len` for a learned position table and `max_length` (default `seq_len`) for
ALiBi, rotary and position-free models, which evaluate beyond their training context.
"""
from __future__ import annotations

import importlib
import sys

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from gptx.data.tokens import GPT2_EOT, GPT2_VOCAB_SIZE, gpt2_encoding, reads_gpt2_bpe
from gptx.errors import ConfigError
from gptx.model.generate import generate
from gptx.training.consolidate import load_plain_model

# lm-eval registers its own models only into an empty registry: let it, before ours goes in.
importlib.import_module("lm_eval.models")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _flag(value) -> bool:
    """lm-eval passes --model_args values as strings (or already parsed)."""
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("gptx")
class GptxLM(TemplateLM):
    """--model_args load=RUN_OR_CHECKPOINT[,master_weights=True,max_length=4096,dtype=bfloat16];
    lm-eval's own --batch_size and --device set those."""

    def __init__(self, load: str | None = None, master_weights=False, device: str | None = None, batch_size=1,
                 max_length=None, dtype: str = "float32", max_batch_size=None, **unknown):
        super().__init__()
        if unknown:  # a misspelt max_length would otherwise evaluate at seq_len without a word
            raise ConfigError(f"--model_args {', '.join(sorted(unknown))}: not an argument of the gptx model; it takes "
                              f"load, master_weights, max_length and dtype (and lm-eval's --batch_size, --device)")
        if not load:
            raise ConfigError("--model_args: load=RUN_DIR (a gptx run directory or checkpoint folder) is required")
        if str(dtype) not in DTYPES:
            raise ConfigError(f"--model_args dtype={dtype}: expected one of {', '.join(DTYPES)}")
        model, cfg = load_plain_model(load, master_weights=_flag(master_weights))
        m = cfg.model
        if not reads_gpt2_bpe(m.vocab_size):
            raise ConfigError(f"--model_args load={load}: lm-eval passes text, which gptx tokenizes with GPT-2 BPE, "
                              f"but this model's vocabulary has {m.vocab_size} tokens")
        self.window = int(max_length) if max_length not in (None, "", "None") else m.seq_len
        if self.window < 2:
            raise ConfigError(f"--model_args max_length={max_length}: must be at least 2")
        if m.position_embedding == "learned" and self.window > m.seq_len:
            raise ConfigError(f"--model_args max_length={self.window}: this model's learned positions end at "
                              f"{m.seq_len}; only alibi, rotary or none positions take longer contexts")
        self.batch = 8 if str(batch_size).startswith("auto") else int(batch_size)  # "auto" picks no size: 8
        if self.batch < 1:
            raise ConfigError(f"--model_args batch_size={batch_size}: must be at least 1")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's --device defaults to cuda; on a machine without one, run where we can.
            print(f"gptx: device {device} is not available here; evaluating on the CPU", file=sys.stderr)
            device = "cpu"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._device.type not in ("cpu", "cuda"):
            raise ConfigError(f"--device {device}: gptx models run on cpu, cuda or cuda:N")
        self.model = model.to(self._device, DTYPES[str(dtype)]).eval()
        self.cfg = cfg
        self.enc = gpt2_encoding()

    # --- what TemplateLM asks for -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return GPT2_EOT

    @property
    def max_length(self) -> int:
        return self.window

    @property
    def tokenizer_name(self) -> str:  # what --apply_chat_template asks for first
        raise ConfigError("--apply_chat_template: gptx models have no chat template; leave the flag out")

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.enc.encode(string, allowed_special={"<|endoftext|>"})

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.enc.decode(tokens)

    @torch.no_grad()
    def _scores(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(input tokens, continuation) pairs -> (sum of the continuation's log-probabilities,
        whether greedy decoding would produce it). The continuation is the input's last
        predictions: input[i + 1] ... followed by the token after the input."""
        longest = max(len(inp) for inp, _ in rows)
        batch = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, (inp, _) in enumerate(rows):
            batch[i, :len(inp)] = torch.tensor(inp)  # right padding: causal positions before it are unaffected
        logp = F.log_softmax(self.model(batch.to(self._device)).float(), dim=-1)
        out = []
        for i, (inp, cont) in enumerate(rows):
            n = len(cont)
            piece = logp[i, len(inp) - n:len(inp)]  # (n, V): the predictions of the continuation's tokens
            target = torch.tensor(cont, device=piece.device)
            greedy = piece[:, :GPT2_VOCAB_SIZE].argmax(-1)  # rows of a table padded by hand are no token
            out.append((float(piece.gather(1, target[:, None]).sum()), bool((greedy == target).all())))
        return out

    def _batched(self, rows: list[tuple[list[int], list[int]]], desc: str, disable: bool) -> list[tuple[float, bool]]:
        """Longest first (similar lengths share a batch, and an out-of-memory shows at once), in the
        requests' order again at the end: the same numbers whatever the batch size."""
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
        results: list = [None] * len(rows)
        with tqdm(total=len(rows), desc=desc, disable=disable) as bar:
            for start in range(0, len(order), self.batch):
                chunk = order[start:start + self.batch]
                for i, score in zip(chunk, self._scores([rows[i] for i in chunk])):
                    results[i] = score
                bar.update(len(chunk))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows, keys = [], []
        for key, context, continuation in requests:
            keys.append(key)
            context = context or [GPT2_EOT]  # a context of only spaces encodes to none: predict from end-of-text
            if len(continuation) > self.window:
                raise ConfigError(f"a continuation of {len(continuation)} tokens does not fit the model's window of "
                                  f"{self.window}; raise max_length (alibi, rotary or none positions)")
            # The window's last tokens: as much of the context as fits before the continuation.
            whole = (context + continuation)[-(self.window + 1):]
            rows.append((whole[:-1], continuation))
        results = self._batched(rows, "gptx loglikelihood", disable_tqdm)
        for key, result in zip(keys, results):  # lm-eval's --use_cache stores what the hook is given
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity tasks: the whole text in disjoint windows, each scored with as much of the
        text before it as the window holds; the first token is predicted from end-of-text."""
        rows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=GPT2_EOT,
                                                         max_seq_len=self.window, context_len=1)
            for context, predicted in map(lm_utils.make_disjoint_window, windows):
                rows.append(((context + predicted)[:-1], predicted))
                owner.append(index)
        scores = self._batched(rows, "gptx rolling loglikelihood", disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, scores):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, seeded sampling) with the KV cache, until a stop string,
        end-of-text or max_gen_toks."""
        out = []
        for request in tqdm(requests, desc="gptx generate_until", disable=disable_tqdm):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [s for s in ([until] if isinstance(until, str) else until) if s]  # "" would stop at once
            max_new = max_new_tokens(kwargs, self.window)
            # As lm-eval's own models read a task: do_sample, or when it is not given, a temperature above 0;
            # then the sampling settings are read (and checked).
            do_sample = kwargs.pop("do_sample", None)
            if do_sample is None:
                sample = "temperature" in kwargs and sampling_settings(kwargs)[0] > 0
            else:
                sample = _flag(do_sample)
            temperature, top_k, top_p = sampling_settings(kwargs) if sample else (1.0, None, None)
            sample = sample and temperature > 0
            prompt = self.tok_encode(context)[-max(1, self.window - max_new):] or [GPT2_EOT]

            def stop(ids: list[int], start=len(prompt)) -> bool:
                return any(s in self.enc.decode(ids[start:]) for s in until)
            ids = generate(self.model, prompt, max_new, greedy=not sample, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=1234, stop_token=GPT2_EOT, stop_when=stop, vocabulary=GPT2_VOCAB_SIZE)
            new = [t for t in ids[len(prompt):] if t != GPT2_EOT]
            text = self.enc.decode(new)
            for s in until:
                text = text.split(s)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out


MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
"""The names tasks give the new-token budget, first wins (lm-eval's own order)."""


def max_new_tokens(kwargs: dict, window: int, default: int = 256) -> int:
    """A task's new-token budget, below the window the prompt must fit in too (none given: 256, or
    what the window leaves of it)."""
    given = [(key, kwargs.pop(key)) for key in MAX_TOKEN_KEYS if key in kwargs]
    given = [(key, value) for key, value in given if value is not None]
    if not given:
        return min(default, window - 1)
    key, value = given[0]
    try:
        budget = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"gen_kwargs {key}: expected a whole number, got {value!r}") from None
    if not 0 < budget < window:
        raise ConfigError(f"gen_kwargs {key} {budget}: must be from 1 to {window - 1}, below the model's "
                          f"{window}-token window that the prompt is read in too")
    return budget


def sampling_settings(kwargs: dict) -> tuple[float, int | None, float | None]:
    """A task's temperature, top_k and top_p as generate() takes them: 0 switches top_k off and a
    top_p of 1 keeps every token, as in Hugging Face's generation config."""
    try:
        temperature = float(kwargs.get("temperature", 1.0))
        top_k = int(kwargs.get("top_k") or 0) or None
        top_p = float(kwargs["top_p"]) if kwargs.get("top_p") is not None else None
    except (TypeError, ValueError):
        raise ConfigError(f"gen_kwargs temperature, top_k, top_p: expected numbers, got {kwargs.get('temperature')!r}, "
                          f"{kwargs.get('top_k')!r}, {kwargs.get('top_p')!r}") from None
    for name, value, ok, expected in (("temperature", temperature, temperature >= 0, ">= 0"),
                                      ("top_k", top_k, top_k is None or top_k >= 1, ">= 0 (0: off)"),
                                      ("top_p", top_p, top_p is None or 0 < top_p <= 1, "in (0, 1]")):
        if not ok:
            raise ConfigError(f"gen_kwargs {name}={value}: must be {expected}")
    return temperature, top_k, top_p
