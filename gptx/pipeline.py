"""Pipeline assembly: the LayerSpec list partitioned into a DeepSpeed PipelineModule.

Each rank builds only the layers of its own stage. The tied embedding lives on the first
and last stage; DeepSpeed all-reduces its gradient across the two and broadcasts it from
the first stage after a load.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from deepspeed.pipe import LayerSpec, PipelineModule

from gptx.config import Config
from gptx.model import layer_specs, lm_loss

# Only blocks are recomputed under activation checkpointing: the embedding's input
# (token ids) has no gradient, and the head is cheap to keep.
CHECKPOINTABLE_LAYERS = ["Block"]


def _checkpoint(function, *args):
    # Non-reentrant checkpointing needs no DeepSpeed RNG tracker set-up and works with
    # inputs that do not require grad.
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


class GPTPipe(PipelineModule):
    """PipelineModule with parameter counting that allocates nothing.

    DeepSpeed's 'parameters' partitioning builds every layer of the whole model, one at a
    time, on every rank just to count parameters. Building on the meta device gives the
    same counts with no memory, so a 175B model partitions instantly. The class name must
    not be 'GPT2ModelPipe': DeepSpeed's engine takes that name to mean "inputs carry an
    attention mask".
    """

    def _count_layer_params(self):
        return count_layer_params(self._layer_specs)


def count_layer_params(specs: list[LayerSpec]) -> list[int]:
    counts = []
    for spec in specs:
        with torch.device("meta"):
            module = spec.build()
        counts.append(sum(p.numel() for p in module.parameters() if p.requires_grad))
    return counts


def build_pipeline(cfg: Config, seed: int | None = None) -> GPTPipe:
    """The PipelineModule for this rank (torch.distributed must be initialized)."""
    t = cfg.train
    return GPTPipe(
        layers=layer_specs(cfg.model, t.seed if seed is None else seed),
        num_stages=t.pipe_parallel_size,
        loss_fn=lm_loss,
        partition_method=t.partition_method,
        activation_checkpoint_interval=t.activation_checkpoint_interval,
        activation_checkpoint_func=_checkpoint,
        checkpointable_layers=CHECKPOINTABLE_LAYERS,
    )


def stage_param_counts(module: PipelineModule) -> list[int]:
    """Parameters held by each stage (a tied embedding counts on both end stages)."""
    mine = sum(p.numel() for p in module.parameters())
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, (module.stage_id, mine))
    per_stage: dict[int, int] = {}
    for stage, n in counts:
        per_stage[stage] = n
    return [per_stage[s] for s in sorted(per_stage)]


def tied_weight_max_diff(module: PipelineModule) -> float:
    """Largest elementwise difference between the copies of each tied weight (0 when in sync)."""
    worst = torch.zeros(1)
    for weight, group in module.get_tied_weights_and_groups():
        reference = weight.detach().clone()
        ranks = dist.get_process_group_ranks(group)
        dist.broadcast(reference, src=min(ranks), group=group)
        worst = torch.maximum(worst, (weight.detach() - reference).abs().max().float().cpu().reshape(1))
    worst = worst.to(next(module.parameters()).device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()
