"""Other projects' GPTs of a gptx model's shape: the benchmark's reference loops and the
separate-process runs of tools/reference_run.py.

`hf`: transformers' GPT2LMHeadModel (its own attention, GELU and loss-free forward; gptx
computes the same cross-entropy on its logits). A path: a nanoGPT-style `model.py` defining
`GPTConfig` (block_size, vocab_size, n_layer, n_head, n_embd, dropout, bias) and `GPT(config)`
whose `forward(idx, targets)` returns `(logits, loss)`, with nanoGPT's parameter names; it
computes its own loss. Both get the padded vocabulary (as nanoGPT pads GPT-2's to 50,304), so
all three multiply matrices of the same shapes.

In the benchmark both start from the gptx model's initial weights, so on the same batches their
losses follow gptx's up to their arithmetic (a test checks it) and it compares speed alone.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from gptx.config import Config
from gptx.data.tokens import check_data, open_tokens
from gptx.errors import ConfigError
from gptx.interop.hf import check_expressible, gpt2_config, gpt2_tensors


def load_reference(reference: str, cfg: Config, gptx_model) -> tuple[torch.nn.Module, object]:
    """(model, loss_fn(x, y)) for `hf` or a nanoGPT-style model.py path, with gptx_model's weights."""
    model, loss_fn = build_reference(reference, cfg, "--reference")
    if reference == "hf":
        sd = gpt2_padded_tensors(gptx_model, cfg.model, conv1d=True)
    else:
        if not cfg.model.tie_embeddings:
            raise ConfigError(f"--reference {reference}: nanoGPT ties its embeddings; this model does not")
        sd = gpt2_padded_tensors(gptx_model, cfg.model, conv1d=False)
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    model.load_state_dict(sd, strict=False)  # HF's masks are buffers of its own
    _check_all_set(model, sd, f"--reference {reference}")
    return model, loss_fn


def build_reference(reference: str, cfg: Config, where: str) -> tuple[torch.nn.Module, object]:
    """(model, loss_fn(x, y)) of the model's shape with the reference's own initialization."""
    if reference != "hf" and not reference.endswith(".py"):  # importlib has no loader for another name
        raise ConfigError(f"{where} {reference}: expected 'hf' or the path of a nanoGPT-style model.py "
                          f"(a Python file ending in .py)")
    try:
        check_expressible(cfg.model)
    except ConfigError as e:
        raise ConfigError(f"{where} {reference}: only a GPT-2-architecture model has references ({e})") from None
    if reference == "hf":
        model = _hf_model(cfg, where)

        def loss_fn(x, y):
            return F.cross_entropy(model(input_ids=x).logits.float().flatten(0, 1), y.flatten())
        return model, loss_fn
    model = build_nanogpt_style(Path(reference), cfg, where)

    def loss_fn(x, y):
        return model(x, y)[1]
    return model, loss_fn


def _hf_model(cfg: Config, where: str):
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"{where} hf needs transformers (pip install transformers; gptx's [dev] extra has it)") from None
    settings = {k: v for k, v in gpt2_config(cfg.model).items() if k != "architectures"}
    settings.update(vocab_size=cfg.model.padded_vocab_size, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings))


def build_nanogpt_style(path: Path, cfg: Config, where: str = "--reference"):
    """GPT(GPTConfig(...)) of the model's shape from a nanoGPT-style model.py, with its own init."""
    m = cfg.model
    if not path.is_file():
        raise ConfigError(f"{where} {path}: expected 'hf' or the path of a nanoGPT-style model.py")
    spec = importlib.util.spec_from_file_location(f"gptx_reference_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    # Under its name in sys.modules, as an import would leave it: torch.compile imports the module
    # of the code it traces by name, and stopped with "No module named 'gptx_reference_model'".
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        config = module.GPTConfig(block_size=m.seq_len, vocab_size=m.padded_vocab_size, n_layer=m.n_layer,
                                  n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout, bias=m.bias)
        return module.GPT(config)
    except Exception as e:  # someone else's file: whatever it raises, say where in one line
        raise ConfigError(f"{where} {path}: cannot build GPT(GPTConfig(...)) from it "
                          f"({type(e).__name__}: {e})") from None


def reference_run(reference: str, cfg: Config, data_dir: Path, batch_size: int, iters: int, lr: float = 6e-4,
                  weight_decay: float = 0.0, fused_adamw: bool = False, grad_clip: float = 1.0,
                  log=lambda msg: None) -> dict:
    """`hf` or a nanoGPT-style model.py trained the way nanoGPT's train.py trains its model, in this
    process (one CPU or GPU, fp32, no compile): random windows of train.bin drawn with
    torch.randint, forward, the next batch, backward, clipping, AdamW (the model's
    configure_optimizers when it has one: nanoGPT's decay/no-decay groups, for-loop AdamW on a
    CPU; otherwise the same groups in PyTorch's default AdamW; `fused_adamw` builds them with
    PyTorch's fused AdamW), zero_grad(set_to_none=True), the loss read back every step.
    The other side of the separate-process comparison in docs/performance.md with `launch/pretrain.py`."""
    import time

    import numpy as np

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(1337)
    T = cfg.model.seq_len
    check_data(data_dir, cfg.model.vocab_size, T)  # the same checks a gptx run makes, one line each
    data = open_tokens(data_dir, "train")
    model, loss_fn = build_reference(reference, cfg, "reference_run")
    model.to(device)

    def get_batch():
        ix = torch.randint(len(data) - T, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x.to(device), y.to(device)

    betas = (0.9, 0.95)
    if fused_adamw or not hasattr(model, "configure_optimizers"):
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused_adamw else {}))
    else:
        optimizer = model.configure_optimizers(weight_decay, lr, betas, device.type)
    seconds, losses = [], []
    x, y = get_batch()
    t0 = time.perf_counter()
    for it in range(iters):
        loss = loss_fn(x, y)
        x, y = get_batch()
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronizes a GPU, as nanoGPT's per-step log line does
        t1 = time.perf_counter()
        seconds.append(t1 - t0)
        t0 = t1
        log(f"iter {it + 1}: loss {losses[-1]:.4f}, {seconds[-1] * 1e3:.1f} ms")
    return {"seconds": seconds, "losses": losses, "tokens_per_iteration": batch_size * T,
            "threads": torch.get_num_threads(), "device": device.type, "fused_adamw": fused_adamw}


def gpt2_padded_tensors(gptx_model, m, conv1d: bool) -> dict[str, torch.Tensor]:
    """GPT-2's names (nn.Linear's layout for nanoGPT: conv1d=False) with the whole padded table."""
    sd = gpt2_tensors(gptx_model, m, conv1d=conv1d)
    sd["transformer.wte.weight"] = gptx_model.layers["0"].wte.weight
    if not m.tie_embeddings:
        sd["lm_head.weight"] = gptx_model.layers[str(3 + m.n_layer)].lm_head.weight
    return sd


def _check_all_set(model: torch.nn.Module, sd: dict, where: str) -> None:
    missing = [name for name, _ in model.named_parameters() if name not in sd]
    if missing:
        raise ConfigError(f"{where}: its parameter {missing[0]} has no gptx counterpart ({len(missing)} in all)")
