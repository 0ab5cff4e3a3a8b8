"""The launcher and subprocess half of tests.unit.model.test_variants."""
import json

import pytest

from tests.helpers.runs import launch, make_token_dir, precision_ds
from tests.unit.model.test_variants import COMPILED_VARIANTS, ITERS, VARIANTS, variant_config


@pytest.fixture(scope="module")
def two_stage_losses(tmp_path_factory):
    """Every variant on 2 stages under the real launcher, in one launch (tests/helpers/variants_matrix.py)."""
    tmp = tmp_path_factory.mktemp("variants")
    data = make_token_dir(tmp / "data")
    result = launch(2, [str(data), str(tmp / "losses.json")], cwd=tmp, script="tests/helpers/variants_matrix.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return data, json.loads((tmp / "losses.json").read_text())


@pytest.mark.parametrize("name", VARIANTS)
def test_two_stages_match_one_stage_and_loss_falls(dist_world1, two_stage_losses, name):
    from gptx.analysis.precision_check import train_trace
    from gptx.data.tokens import open_tokens
    data, two_stages = two_stage_losses
    one = train_trace(variant_config(name, pipe=1), precision_ds("fp32"), open_tokens(data, "train"), ITERS).losses
    two = two_stages[name]
    assert len(one) == len(two) == ITERS
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5
    assert two[-1] < two[0]


@pytest.mark.parametrize("name", COMPILED_VARIANTS)
def test_compiled_blocks_on_two_stages_train_like_eager_ones(two_stage_losses, name):
    from tests.unit.parallel.test_compile import COMPILE_TOL
    _, losses = two_stage_losses
    eager, compiled = losses[name], losses[f"{name}+compiled"]
    assert len(compiled) == ITERS and max(abs(a - b) for a, b in zip(eager, compiled)) < COMPILE_TOL["fp32"]
