"""tools/compare_variants.py's bad input: one line, exit 2, before any launch."""
import pytest

from gptx.cli.compare_variants import run_compare_variants


@pytest.mark.parametrize("argv,needle", [
    (["--variants", "gpt2", "nosuch"], "argument --variants: invalid choice: 'nosuch'"),
    (["--iters", "0"], "--iters: must be >= 1, got 0"),
    (["--num-gpus", "0"], "--num-gpus: must be >= 1, got 0"),
    (["--model", "nosuch"], "nosuch"),
])
def test_bad_input_is_one_line_before_any_launch(tmp_path, capsys, argv, needle):
    out = tmp_path / "compare"
    assert run_compare_variants([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], captured.err
    assert "Traceback" not in captured.err and not out.exists()
