"""The launcher half of tests.unit.cli.test_compare_variants: a variant whose run fails."""
from gptx.cli.compare_variants import run_compare_variants


def test_a_variant_whose_run_fails_is_one_line_naming_its_log(tmp_path, capsys):
    out = tmp_path / "compare"
    # A flag the tool does not know goes to every run: here one that launch/pretrain.py refuses.
    code = run_compare_variants(["--variants", "alibi", "--iters", "1", "--num-gpus", "1", "--out", str(out),
                                 "--lr-decay", "5"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    log = out / "alibi.log"
    assert err == [f"error: variant alibi: its run exited 2 (error: unrecognized arguments: --lr-decay 5 (see "
                   f"launch/pretrain.py --help)); its output is in {log}"], err
    assert "unrecognized arguments" in log.read_text()
