"""ZB-H1 against 1F1B under the real launcher: 4 ranks as 4 stages and as 2 stages x 2 data-parallel
replicas, every case on the same batches with 1, 2, p, 2p + 1 and 3 micro-batches in successive steps
(tests/helpers/schedule_matrix.py runs them all in one launch)."""
import json

from gptx.analysis.precision_check import Trace, max_loss_diff
from gptx.testing import CPU_FP16_ENV
from tests.helpers.runs import launch, make_token_dir
from tests.helpers.schedule_matrix import CASES


def test_zb_h1_trains_the_losses_of_1f1b_on_4_stages_and_2x2(tmp_path):
    data = make_token_dir(tmp_path / "data")
    out = tmp_path / "traces.json"
    result = launch(4, [str(data), str(out)], cwd=tmp_path, script="tests/helpers/schedule_matrix.py",
                    env={CPU_FP16_ENV: "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    traces = {k: Trace(**v) for k, v in json.loads(out.read_text()).items()}
    for name, *_ in CASES:
        one, zero = traces[f"{name}/1f1b"], traces[f"{name}/zb-h1"]
        # fp32 to 1e-6; in half precision the same sums in the same order, so the same bits are expected too.
        assert max_loss_diff(one, zero) < 1e-6, (name, one.losses, zero.losses)
        assert one.grad_norms == zero.grad_norms or all(
            a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(a))
            for a, b in zip(one.grad_norms, zero.grad_norms)), (name, one.grad_norms, zero.grad_norms)
        assert one.skipped == zero.skipped and one.scales == zero.scales, name
    overflow = traces["4x1/fp16-zero1-overflow/zb-h1"]
    assert overflow.skipped[2] == 1 and overflow.skipped[1] == 0  # the inf from a W-computed gradient skipped step 3
    # The 4-stage fp32 run learns (so the comparison is not between two runs that do nothing).
    assert traces["4x1/fp32/zb-h1"].losses[-1] < traces["4x1/fp32/zb-h1"].losses[0]
