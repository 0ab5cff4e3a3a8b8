"""The launcher and subprocess half of tests.unit.model.test_variants."""
import json

import pytest

from tests.helpers.runs import precision_ds, sequence_code, sequence_output
from tests.unit.model.test_variants import COMPILED_VARIANTS, ITERS, VARIANTS, variant_config


@pytest.fixture(scope="module")
def two_stage_losses(two_ranks):
    """Every variant on 2 stages under the real launcher (tests/helpers/variants_matrix.py), a run of the
    shared 2-rank launch (tests/integration/conftest.py)."""
    logs = two_ranks / "logs"
    assert sequence_code(logs, "variants") == 0, sequence_output(logs, "variants")[-3000:]
    return two_ranks / "micro_data", json.loads((two_ranks / "variants.json").read_text())


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
