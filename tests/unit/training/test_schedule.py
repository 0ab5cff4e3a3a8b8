import math

import pytest
import torch

from gptx.training.schedule import WarmupCosine, lr_at, schedule_of


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


def test_the_batch_ramp_grows_by_even_steps_to_the_full_batch():
    from gptx.training.schedule import BatchRamp

    # GPT-3 125M's shape in sequences of 2048: 16 -> 256 by 16, over 2,000,000 samples (Megatron's syntax).
    ramp = BatchRamp.parse("16,16,2000000", full=256, stride=8)
    assert ramp.steps == 15
    assert [ramp.size_at(c) for c in (0, 133_333, 133_334, 1_999_999, 2_000_000, 10 ** 12)] == [16, 16, 32, 240, 256, 256]
    sizes, consumed = [], 0
    for _ in range(40_000):  # the ramp takes about 27,700 steps
        sizes.append(ramp.size_at(consumed))
        consumed += sizes[-1]
    assert sizes == sorted(sizes) and set(sizes) == set(range(16, 257, 16))
    assert ramp.samples_over(40_000) == consumed


@pytest.mark.parametrize("text,needle", [
    ("4,2", "expected 'START,INCREMENT,SAMPLES'"),
    ("8,2,100", "the start batch must be between 0 and the full batch 8"),
    ("3,2,100", "the start 3 must be a multiple of micro-batch x data-parallel size (2)"),
    ("2,4,100", "full batch 8 - start 2 must be a multiple of the increment 4"),
])
def test_a_ramp_that_cannot_reach_the_full_batch_is_refused(text, needle):
    from gptx.errors import ConfigError
    from gptx.training.schedule import BatchRamp
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        BatchRamp.parse(text, full=8, stride=2)


def test_the_sequence_length_warmup_holds_each_length_from_its_iteration():
    from gptx.training.schedule import SeqLenWarmup
    warmup = SeqLenWarmup.parse("0:128, 3750:192, 7500:256, 11250:384, 15000:512", seq_len=512)  # GPT*'s 1B run
    assert [warmup.length_at(i) for i in (0, 3749, 3750, 7499, 11250, 14999, 15000, 10 ** 9)] == \
        [128, 128, 192, 192, 384, 384, 512, 512]


@pytest.mark.parametrize("text,needle", [
    ("0:128,100", "expected 'ITER:LEN,ITER:LEN,...'"),
    ("10:128,100:256", "must start at 0 and increase"),
    ("0:128,100:256,50:512", "must start at 0 and increase"),
    ("0:128,100:1024", "length 1024 is outside 1..512"),
])
def test_a_bad_warmup_is_one_line(text, needle):
    from gptx.errors import ConfigError
    from gptx.training.schedule import SeqLenWarmup
    with pytest.raises(ConfigError, match=needle):
        SeqLenWarmup.parse(text, seq_len=512)


def test_decays_that_end_within_the_warmup_are_one_schedule():
    """Why schedule_of folds them into one: their LRs agree at every step."""
    train = {"lr": 1.0, "min_lr": 0.1, "warmup_iters": 5, "train_iters": 3}
    runs = [schedule_of({**train, "lr_decay_iters": d}) for d in (None, 1, 5)]
    assert runs[0] == runs[1] == runs[2] and runs[0]["decay_iters"] == 5
    lrs = lambda decay: [lr_at(step, 1.0, 0.1, 5, decay) for step in range(12)]
    assert lrs(3) == lrs(1) == lrs(5) and lrs(5) != lrs(6)
