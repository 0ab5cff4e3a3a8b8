import math

import pytest
import torch

from gptx.schedule import WarmupCosine, lr_at


def test_warmup_cosine_floor():
    lr, floor, warm, decay = 1.0, 0.1, 10, 110
    assert lr_at(0, lr, floor, warm, decay) == pytest.approx(1 / 11)
    assert lr_at(9, lr, floor, warm, decay) == pytest.approx(10 / 11)
    assert lr_at(10, lr, floor, warm, decay) == pytest.approx(1.0)
    assert lr_at(60, lr, floor, warm, decay) == pytest.approx(floor + 0.5 * (lr - floor))
    assert lr_at(110, lr, floor, warm, decay) == pytest.approx(floor)
    assert lr_at(500, lr, floor, warm, decay) == pytest.approx(floor)
    values = [lr_at(s, lr, floor, warm, decay) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_scheduler_sets_lr_and_round_trips_its_state():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    sched = WarmupCosine(opt, lr=1.0, min_lr=0.0, warmup_iters=2, decay_iters=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 3)
    for _ in range(5):
        sched.step()
    state = sched.state_dict()
    other = WarmupCosine(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), 1.0, 0.0, 2, 10)
    other.load_state_dict(state)
    assert other.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 8)))
