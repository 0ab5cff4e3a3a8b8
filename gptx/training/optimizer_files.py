"""What a checkpoint's optimizer files hold for each parameter, whatever DeepSpeed optimizer wrote
them: a 16-bit run's fp32 master weights, Adam's two moments and its step count. Values come
keyed like the layer files (layer index -> key in its file -> tensor), so any layout can take them.

Files are memory-mapped, and a value is joined from its pieces only when it is read (LazyLayer):
a rank resuming a large model holds one parameter's full values at a time (FP16_Optimizer: one
group's), not its stages' whole optimizer state.
Where DeepSpeed keeps them, per pipeline stage (the no-pipeline model is one stage, 0):
- ZeRO-1/2 and DeepSpeed's bf16 optimizer: one file per data-parallel rank, each holding a slice
  of every flat group (the masters, and the torch optimizer's state of that slice), with
  `param_slice_mappings` saying where each parameter's fragment lies in it;
- without ZeRO: the stage's model-states file, whose torch optimizer state is kept per tensor
  (fp32, FP16_UnfusedOptimizer) or per flat group (FP16_Optimizer), in the stage's parameter order;
- ZeRO-3 (no pipeline only): one file per rank again, but each parameter is cut into equal
  chunks, one per rank, and a rank's flat groups hold its chunk of every parameter in the order
  of `param_shapes` (in the ranks' model-states files).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from gptx.config import Config
from gptx.errors import CheckpointError
from gptx.model.gpt import layer_specs
from gptx.parallel.ds_config import precision
from gptx.parallel.optimizer_state import LOSS_SCALE_KEYS
from gptx.parallel.pipeline import layer_compute_weights, partition
from gptx.training.checkpoint_files import META, read_torch_file

MASTERS = "fp32"  # the key the fp32 master weights are read under, beside the optimizer's own state keys
MOMENTS = ("exp_avg", "exp_avg_sq")
ADAM_TYPES = ("adam", "adamw")

Pieces = list[torch.Tensor]  # 1-D views into memory-mapped files: one parameter's values, in order
Values = dict[tuple[int, str], Pieces]  # (layer index, key in its layer file) -> its pieces


class LazyLayer(Mapping):
    """A layer's values (key in its layer file -> tensor), each joined from its pieces when read."""

    def __init__(self):
        self.parts: dict[str, tuple[Pieces, torch.Size]] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        pieces, shape = self.parts[key]
        flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return flat[:shape.numel()].reshape(shape)  # ZeRO-3's last chunk carries padding

    def __iter__(self):
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)


Layers = dict[int, Mapping[str, torch.Tensor]]


def _cut(segments: list[torch.Tensor], start: int, length: int) -> Pieces:
    """Views of values start .. start + length of 1-D segments laid end to end."""
    pieces, offset = [], 0
    for segment in segments:
        end = offset + segment.numel()
        if end > start and offset < start + length:
            pieces.append(segment[max(start, offset) - offset:min(start + length, end) - offset])
        offset = end
    return pieces


def param_layer_key(name: str) -> tuple[int, str]:
    """A parameter's name in a stage module or the no-pipeline model -> (layer index, key in its layer file)."""
    if name.startswith("layers."):  # the no-pipeline model: layers.<index>.<key>
        name = name[len("layers."):]
    if name.startswith("tied_modules."):
        return 0, name.split(".", 2)[2]  # the tied embedding is layer 0's
    idx, key = name.split(".", 1)
    return int(idx), key


def stage_param_order(cfg: Config, stage_layers: range) -> list[list[tuple[int, str, torch.Size]]]:
    """(layer index, key in its layer file, shape) of one stage's parameters, per optimizer group.

    The order DeepSpeed flattens them in: the stage module's parameters() (the tied
    embedding's module first, then the other layers by index), split into gptx's two
    param_groups (matrices, then vectors).
    """
    from deepspeed.pipe import TiedLayerSpec

    specs = layer_specs(cfg.model, cfg.train.seed)
    tied, rest = [], []
    for idx in stage_layers:
        spec = specs[idx]
        with torch.device("meta"):
            module = spec.build()
        named = [(idx, k, p.shape) for k, p in module.named_parameters()]
        if isinstance(spec, TiedLayerSpec):
            tied = tied or [(0, k, shape) for _, k, shape in named]  # the head's weights are layer 0's
        else:
            rest += named
    ordered = tied + rest
    groups = [[x for x in ordered if len(x[2]) >= 2], [x for x in ordered if len(x[2]) < 2]]
    return [g for g in groups if g]


def _latest_step(states) -> int | None:
    """The step count of per-tensor states: DeepSpeed's FusedAdam advances only the last tensor's of each
    group (the one it hands its kernel), torch's Adam all of them."""
    steps = [int(state["step"]) for state in states if state and state.get("step") is not None]
    return max(steps) if steps else None


def _base_state(sd: dict) -> dict:
    """Group index -> the torch optimizer's state of a ZeRO-1/2 or bf16 file's slice: a torch state
    dict's "state", or with zero_optimization.elastic_checkpoint a list with one state per group."""
    base = sd.get("base_optimizer_state") or {}
    return base.get("state", {}) if isinstance(base, dict) else dict(enumerate(base))


def _has_stepped(folder: Path, meta: dict) -> bool:
    """Whether the optimizer has state at all: none before its first step (a checkpoint of iteration 0,
    or one whose steps fp16 all skipped), which is what a new optimizer starts from."""
    files = _zero_files(folder, 0, meta["data_parallel_size"])
    if files:
        sd = read_torch_file(files[0], weights_only=False, mmap=True)["optimizer_state_dict"]
        state = sd["optimizer_state_dict"].get("state") if "fp32_flat_groups" in sd else _base_state(sd)
    else:
        opt = read_torch_file(folder / "mp_rank_00_model_states.pt", weights_only=False, mmap=True).get("optimizer")
        state = (opt or {}).get("optimizer_state_dict", opt or {}).get("state")
    return any((state or {}).values())  # elastic checkpoints keep an empty state per group


def _partitioned(files: list[Path], keys: tuple[str, ...]) -> tuple[dict[str, Values], int | None]:
    """A stage's values from its ZeRO-1/2 or bf16 optimizer files (one per data-parallel rank), and
    the optimizer's step count.

    Each rank holds a slice of every flat group; `param_slice_mappings` says where each
    parameter's fragment starts in that rank's slice (the optimizer's state has the slice's
    layout, plus padding at its end), which also covers DeepSpeed's alignment padding.
    """
    states = [read_torch_file(f, weights_only=False, mmap=True)["optimizer_state_dict"] for f in files]
    pieces: dict[str, dict[str, list[tuple[int, torch.Tensor]]]] = {key: {} for key in keys}
    step = None
    for g in range(len(states[0]["single_partition_of_fp32_groups"])):
        base = 0
        for sd in states:
            part = sd["single_partition_of_fp32_groups"][g]
            state = _base_state(sd).get(g, {})
            step = _latest_step([state, {"step": step}])
            for key in keys:
                values = part if key == MASTERS else state.get(key)
                if values is None:
                    raise CheckpointError(f"checkpoint file '{files[0]}': no optimizer state '{key}'")
                for name, frag in sd["param_slice_mappings"][g].items():
                    pieces[key].setdefault(name, []).append((base + frag.start,
                                                             values[frag.start:frag.start + frag.numel]))
            base += part.numel()
    return {key: {param_layer_key(name): [t for _, t in sorted(frags, key=lambda x: x[0])]
                  for name, frags in by_name.items()} for key, by_name in pieces.items()}, step


def _zero3(files: list[Path], keys: tuple[str, ...]) -> tuple[dict[str, Values], int | None]:
    """The no-pipeline model's values from ZeRO-3's files (one per data-parallel rank), and the step count."""
    states = [read_torch_file(f, weights_only=False, mmap=True)["optimizer_state_dict"] for f in files]
    model_states = files[0].parent / files[0].name.replace("optim_states", "model_states").removeprefix("bf16_")
    shapes = {name: shape for group in read_torch_file(model_states, weights_only=False)["param_shapes"]
              for name, shape in group.items()}
    inner = [sd["optimizer_state_dict"]["state"] for sd in states]
    step = _latest_step(inner[0].values())
    values: dict[str, Values] = {}
    for key in keys:
        try:  # each rank's sub-groups, laid end to end
            ranks = [list(sd["fp32_flat_groups"]) if key == MASTERS else [state[g][key] for g in sorted(state)]
                     for sd, state in zip(states, inner)]
        except KeyError:
            raise CheckpointError(f"checkpoint file '{files[0]}': no optimizer state '{key}'") from None
        values[key], offset = {}, 0
        for name, shape in shapes.items():
            chunk = math.ceil(shape.numel() / len(files))  # the last rank's chunk is padded
            pieces = [piece for segments in ranks for piece in _cut(segments, offset, chunk)]
            values[key][param_layer_key(name)] = pieces
            offset += chunk
    return values, step


def _flat_groups(states: dict, key: str, where: str) -> tuple[list[list[torch.Tensor]], int | None]:
    """Each optimizer group's values as 1-D segments laid end to end, from a stage's model-states
    file (no ZeRO), and the step count."""
    opt = states.get("optimizer") or {}
    if key == MASTERS:
        if "fp32_groups_flat" in opt:  # FP16_Optimizer (fused Adam): one flat tensor per group
            return [[flat] for flat in opt["fp32_groups_flat"]], None
        if "fp32_groups" in opt:  # FP16_UnfusedOptimizer: a list of tensors per group
            return [[t.reshape(-1) for t in group] for group in opt["fp32_groups"]], None
        raise CheckpointError(f"checkpoint '{where}': no fp32 master weights in DeepSpeed's optimizer state")
    inner = opt.get("optimizer_state_dict", opt)  # the 16-bit optimizers wrap the torch optimizer's state
    state = inner.get("state") or {}
    try:
        flat = [[state[i][key].reshape(-1) for i in group["params"]] for group in inner["param_groups"]]
    except (KeyError, TypeError):
        raise CheckpointError(f"checkpoint '{where}': no optimizer state '{key}' for every parameter") from None
    return flat, _latest_step(state.values())


def _in_order(groups: list[list[torch.Tensor]], order: list[list[tuple[int, str, torch.Size]]], where: str) -> Values:
    """Groups' segments cut into the stage's parameters, in the order DeepSpeed flattened them."""
    if len(groups) != len(order):
        raise CheckpointError(f"checkpoint '{where}': {len(groups)} optimizer groups, gptx expects {len(order)}")
    values = {}
    for segments, entries in zip(groups, order):
        held, wanted = sum(t.numel() for t in segments), sum(shape.numel() for _, _, shape in entries)
        if held != wanted:
            raise CheckpointError(f"checkpoint '{where}': an optimizer group holds {held} values, the stage's "
                                  f"parameters {wanted}")
        offset = 0
        for idx, key, shape in entries:
            values[(idx, key)] = _cut(segments, offset, shape.numel())
            offset += shape.numel()
    return values


def _zero_files(folder: Path, stage: int, dp: int) -> list[Path]:
    """The stage's per-replica optimizer files (ZeRO, or the bf16 optimizer), or [] without them."""
    found = sorted(folder.glob(f"*zero_pp_rank_*_mp_rank_{stage:02d}_optim_states.pt"))
    if not found:
        return []
    prefix = found[0].name.split("zero_pp_rank_")[0]
    return [folder / f"{prefix}zero_pp_rank_{d}_mp_rank_{stage:02d}_optim_states.pt" for d in range(dp)]


def _is_zero3(file: Path) -> bool:
    return "fp32_flat_groups" in read_torch_file(file, weights_only=False, mmap=True)["optimizer_state_dict"]


def _stage_layers(meta: dict, cfg: Config) -> list[range]:
    specs = layer_specs(cfg.model, cfg.train.seed)
    pp = meta.get("pipe_parallel_size")
    if pp == 0:
        return [range(len(specs))]
    parts = partition(specs, cfg.train.partition_method, pp, layer_compute_weights(cfg, specs))
    return [range(parts[s], parts[s + 1]) for s in range(pp)]


def _read(folder: Path, meta: dict, cfg: Config, keys: tuple[str, ...],
          wanted: set[int] | None) -> tuple[dict[str, Layers], int | None]:
    """`keys`' values of the stages holding a `wanted` layer (all without `wanted`), and the step count.
    The tied embedding is taken from the first stage (its copies are kept equal)."""
    dp = meta.get("data_parallel_size")
    layers: dict[str, Layers] = {key: {} for key in keys}
    step = None
    for stage, stage_layers in enumerate(_stage_layers(meta, cfg)):
        if wanted is not None and not wanted.intersection(stage_layers):
            continue
        order = stage_param_order(cfg, stage_layers)
        shapes = {(idx, key): shape for group in order for idx, key, shape in group}
        files = _zero_files(folder, stage, dp)
        if files:
            values, stage_step = (_zero3 if _is_zero3(files[0]) else _partitioned)(files, keys)
        else:
            states = read_torch_file(folder / f"mp_rank_{stage:02d}_model_states.pt", weights_only=False, mmap=True)
            values, stage_step = {}, None
            for key in keys:
                flat, stage_step = _flat_groups(states, key, str(folder))
                values[key] = _in_order(flat, order, str(folder))
        step = step if stage_step is None else int(stage_step)
        for key, by_param in values.items():
            if by_param.keys() != shapes.keys():
                raise CheckpointError(f"checkpoint '{folder}': stage {stage}'s optimizer holds other parameters "
                                      f"than the model in {META}")
            for (idx, name), pieces in by_param.items():
                held, shape = sum(t.numel() for t in pieces), shapes[(idx, name)]
                if held < shape.numel() or (held > shape.numel() and not files):
                    raise CheckpointError(f"checkpoint '{folder}': {key} of {idx}.{name} has {held} values, the "
                                          f"model {shape.numel()}")
                layers[key].setdefault(idx, LazyLayer()).parts.setdefault(name, (pieces, shape))
    return layers, step


@contextlib.contextmanager
def _readable(folder: Path):
    """Optimizer files of a form gptx does not know (another DeepSpeed, a damaged pickle) as one line."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint '{folder}': its optimizer files are not as gptx reads them "
                              f"({type(e).__name__}: {e}); resume it on the layout it was saved with") from None


def _check_has_optimizer(folder: Path, meta: dict) -> None:
    if meta.get("weights_only") or not meta.get("data_parallel_size") or meta.get("pipe_parallel_size") is None:
        raise CheckpointError(f"checkpoint '{folder}' holds no optimizer state (weights only)")


def fp32_master_weights(folder: Path, meta: dict, cfg: Config, wanted: set[int] | None = None) -> Layers | None:
    """Layer index -> state dict from the optimizer's fp32 master copies, or None when the run was fp32.
    With `wanted` layers, only the stages holding one of them are read (a pipeline's optimizer files are large)."""
    if precision(meta.get("ds_config") or {}) == "fp32":
        return None
    _check_has_optimizer(folder, meta)
    with _readable(folder):
        return _read(folder, meta, cfg, (MASTERS,), wanted)[0][MASTERS]


def adam_amsgrad(ds_config: dict) -> bool | None:
    """Whether a DeepSpeed JSON's Adam or AdamW keeps amsgrad's maximum, or None for another optimizer."""
    optimizer = ds_config.get("optimizer") or {}
    if str(optimizer.get("type", "")).lower() not in ADAM_TYPES:
        return None
    return bool((optimizer.get("params") or {}).get("amsgrad"))


def adam_state(folder: Path, meta: dict, cfg: Config,
               wanted: set[int] | None = None) -> tuple[int, dict[str, Layers]] | None:
    """(Adam's step count, {moment: layer index -> state dict}) of the stages holding a `wanted` layer
    ((0, {}) before the first step), or None for an optimizer other than Adam or AdamW. With
    amsgrad, the moments include the largest second moment so far (max_exp_avg_sq)."""
    _check_has_optimizer(folder, meta)
    amsgrad = adam_amsgrad(meta.get("ds_config") or {})
    if amsgrad is None:
        return None
    with _readable(folder):
        if not _has_stepped(folder, meta):
            return 0, {}
        moments, step = _read(folder, meta, cfg, MOMENTS + ("max_exp_avg_sq",) * amsgrad, wanted)
    if step is None:
        raise CheckpointError(f"checkpoint '{folder}': its optimizer state has no step count")
    return step, moments


def loss_scale_state(folder: Path, meta: dict) -> dict | None:
    """A fp16 run's dynamic loss scale as its optimizer saved it (LOSS_SCALE_KEYS; the stages keep
    one scale), or None for bf16 and fp32 runs and a static scale (the new run's JSON says its own)."""
    if precision(meta.get("ds_config") or {}) != "fp16":
        return None
    _check_has_optimizer(folder, meta)
    with _readable(folder):
        return _saved_loss_scale(folder, meta)


def _saved_loss_scale(folder: Path, meta: dict) -> dict | None:
    files = _zero_files(folder, 0, meta["data_parallel_size"])
    if files:  # ZeRO pickles its scaler object
        scaler = read_torch_file(files[0], weights_only=False, mmap=True)["optimizer_state_dict"].get("loss_scaler")
        dynamic = getattr(scaler, "dynamic", False)
        saved = {key: getattr(scaler, key) for key in LOSS_SCALE_KEYS if hasattr(scaler, key)} if dynamic else {}
    else:  # FP16_Optimizer and FP16_UnfusedOptimizer keep the values in their state dict
        opt = read_torch_file(folder / "mp_rank_00_model_states.pt", weights_only=False, mmap=True).get("optimizer")
        dynamic = (opt or {}).get("dynamic_loss_scale")
        saved = {key: opt[key] for key in LOSS_SCALE_KEYS if key in opt} if dynamic else {}
    return saved or None
