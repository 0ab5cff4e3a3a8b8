"""What a resume on another layout can carry of Adam's state, by configuration (the state itself:
tests/unit/training/test_checkpoint.py)."""
import pytest

from gptx.training.relayout import adam_state_blocker

ADAMW = {"type": "AdamW", "params": {"weight_decay": 0.1}}
AMSGRAD = {"type": "AdamW", "params": {"amsgrad": True}}
ZERO3 = lambda **offload: {"stage": 3, "offload_optimizer": offload}


@pytest.mark.parametrize("saved, now, reason", [
    (ADAMW, ADAMW, None),
    ({"type": "Adam"}, ADAMW, None),  # Adam and AdamW keep the same state
    ({"type": "Lion"}, ADAMW, "Adam's and AdamW's"),
    (ADAMW, {"type": "SGD"}, "Adam's and AdamW's"),
    (AMSGRAD, ADAMW, "amsgrad differs"),
    (ADAMW, AMSGRAD, "amsgrad differs"),
    (AMSGRAD, AMSGRAD, None),
])
def test_adams_state_carries_between_adam_optimizers_of_the_same_amsgrad(saved, now, reason):
    blocker = adam_state_blocker({"ds_config": {"optimizer": saved}}, {"optimizer": now})
    assert blocker == reason if reason is None else reason in blocker


@pytest.mark.parametrize("zero, carried", [
    (ZERO3(device="cpu"), True),
    (ZERO3(device="nvme", nvme_path="/local"), False),  # the swapper keeps the state in files
    (ZERO3(device="cpu", ratio=0.5), False),  # part of it is stepped by another optimizer on the device
    ({"stage": 1, "offload_optimizer": {"device": "cpu"}}, True),
])
def test_zero3_optimizer_state_that_is_swapped_or_split_restarts(zero, carried):
    meta = {"ds_config": {"optimizer": ADAMW}}
    assert (adam_state_blocker(meta, {"optimizer": ADAMW, "zero_optimization": zero}) is None) == carried
