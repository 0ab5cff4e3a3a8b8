"""What a run measures besides its training loss: the validation loss of each source, and a
sample of text, both at the evaluation interval and both cut short by a stop signal."""
from __future__ import annotations

import torch.distributed as dist

from gptx.data.tokens import GPT2_EOT, GPT2_VOCAB_SIZE, TokenWindows
from gptx.model.generate import generate
from gptx.model.gpt import GPT
from gptx.parallel.data_parallel import DataParallelEngine, layer_states
from gptx.training.plan import Plan


def validation_loss(engine, val_splits: list, plan: Plan, dp_rank: int,
                    stopped=lambda: None) -> tuple[float, list[float]] | str:
    """Token-weighted mean loss over the first eval_iters batches of each source's val split;
    overall, the sources' losses weighted by their shares of the mixture. Collective `stopped()`
    after each batch: its answer (a signal's name) instead, once it has one."""
    layout, cfg = plan.layout, plan.cfg
    per_source = []
    for tokens in val_splits:
        windows = TokenWindows(tokens, cfg.model.seq_len, layout.micro_batch, dp_rank, layout.dp_size, shuffle=False)
        # Every micro-batch holds the same number of tokens, so the mean of means is token-weighted.
        # The JSON's micro-batches per evaluation batch, whatever the ramp has the engine train with.
        losses = []
        for _ in range(cfg.train.eval_iters):
            losses.append(float(engine.eval_batch(windows, num_micro_batches=layout.grad_accum)))
            if signal_name := stopped():
                return signal_name
        per_source.append(sum(losses) / len(losses))
    return sum(s.weight * loss for s, loss in zip(plan.sources, per_source)), per_source


def sample_text(engine, plan: Plan, iteration: int, stopped=lambda: False) -> str | None:
    """Collective: gather every stage's layers to rank 0, which generates from the plain model
    (ending early once `stopped()`).

    Costs a copy of the weights on rank 0's host, so it is an option for small and medium
    models. Its own seeded generator leaves the training RNG streams untouched.
    """
    gathered = gather_layer_states(engine)
    if dist.get_rank() != 0:
        return None
    cfg = plan.cfg
    model = GPT(cfg.model, seed=cfg.train.seed)
    for part in gathered:
        for idx, state in part.items():
            model.layers[str(idx)].load_state_dict(state)
    enc = plan.encoding
    prompt = (enc.encode_ordinary(cfg.train.sample_prompt) or [GPT2_EOT]) if enc else [0]
    ids = generate(model, prompt, cfg.train.sample_tokens, temperature=0.8, top_k=40, seed=cfg.train.seed + iteration,
                   stop_token=GPT2_EOT if enc else None, vocabulary=GPT2_VOCAB_SIZE if enc else None,
                   stop_when=lambda ids: stopped())
    return enc.decode(ids) if enc else " ".join(map(str, ids))


def gather_layer_states(engine) -> list[dict] | None:
    """Collective: at rank 0, a list of {layer index: state dict (fp32, host)} covering every layer."""
    if isinstance(engine, DataParallelEngine):
        states = layer_states(engine)
        return [{i: {k: v.float() for k, v in s.items()} for i, s in states.items()}] if states is not None else None
    module = engine.module
    mine = {}
    if engine.grid.get_data_parallel_rank() == 0:
        for local, layer in enumerate(module.forward_funcs):
            if hasattr(layer, "state_dict"):  # the tied head is a function of the embedding
                mine[local + module._local_start] = {k: v.detach().float().cpu() for k, v in layer.state_dict().items()}
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered
