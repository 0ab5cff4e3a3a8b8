"""tools/gpu_bench.py on a CPU: the GPU plan at tiny shapes, every row built, timed and written."""
import json

import pytest
import torch

from gptx.analysis.gpu_bench_report import lever_gains
from gptx.cli.gpu_bench import run_gpu_bench

REQUIRED = ("model", "precision", "loop", "setting", "micro_batch", "tokens_per_sec", "mfu", "peak_memory_gib")


@pytest.fixture(scope="module")
def bench(tmp_path_factory, dist_world1):
    out = tmp_path_factory.mktemp("gpu_bench")
    # compile is left out here (inductor's first compilation costs minutes on 2 cores);
    # tests/unit/parallel/test_compile.py checks compiled blocks against eager ones.
    assert run_gpu_bench(["--levers", "pad,fused,one_stage", "--iters", "2", "--warmup", "1",
                          "--out-dir", str(out)]) == 0
    (json_path,) = out.glob("*.json")
    (md_path,) = out.glob("*.md")
    return json.loads(json_path.read_text()), md_path.read_text(), json_path


def test_the_result_file_has_what_the_issue_asks_for(bench):
    report, markdown, path = bench
    assert path.name.endswith("-cpu.json") and path.name[:10] == report["date"]
    for key in ("device", "torch", "cuda", "deepspeed", "date", "rows"):
        assert key in report
    for row in report["rows"]:
        assert set(REQUIRED) <= set(row) and row["error"] is None, row
        assert row["tokens_per_sec"] > 0 and row["mfu"] > 0
    # One table line per row, in the markdown beside it.
    assert sum(line.startswith("| gpt2") for line in markdown.splitlines()) == len(report["rows"])


def test_every_lever_is_measured_on_and_off_beside_the_reference(bench):
    report, _, _ = bench
    small = [(r["loop"], r["setting"]) for r in report["rows"] if r["model"] == "gpt2"]
    assert sorted(small) == sorted([("gptx", "all levers"), ("gptx", "all but pad"), ("gptx", "all but fused"),
                                    ("gptx", "all but one_stage"), ("gptx", "no levers"),
                                    ("reference", "build-nanogpt recipe")])
    assert [(r["loop"], r["setting"]) for r in report["rows"] if r["model"] == "gpt2-xl"] == [("gptx", "all levers")]
    gains = lever_gains(report["rows"])
    assert sorted(lever for (_, _, lever) in gains) == ["fused", "one_stage", "pad"]


def test_rows_train_the_same_model_on_the_same_batches(bench):
    # The gpt2 rows of one table width start from the same weights (a padded table draws its
    # initial rows differently) and see the same first batch: whatever the fused loss, the engine
    # or the reference loop change, the first loss must not move.
    report, _, _ = bench
    small = [r for r in report["rows"] if r["model"] == "gpt2"]
    padded = [r for r in small if r["loop"] == "reference" or "pad" in r["levers"]]
    unpadded = [r for r in small if r not in padded]
    assert len(padded) == 4 and len(unpadded) == 2
    for rows in (padded, unpadded):
        first = [r["losses"][0] for r in rows]
        assert max(first) - min(first) < 1e-5, {r["setting"]: r["losses"][0] for r in rows}
    assert all(len(r["losses"]) == 3 for r in small)  # one warm-up and two timed iterations each


def test_a_later_call_adds_its_groups_to_the_same_file(bench, tmp_path):
    # A device lease's calls are short, so the groups are split over calls: the second call's
    # rows join the first's file, and a group run again replaces its own rows.
    report, _, json_path = bench
    (tmp_path / json_path.name).write_text(json_path.read_text())
    assert run_gpu_bench(["--models", "gpt2-xl", "--levers", "pad", "--iters", "1", "--warmup", "1",
                          "--out-dir", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / json_path.name).read_text())
    assert [r for r in merged["rows"] if r["model"] == "gpt2"] == [r for r in report["rows"] if r["model"] == "gpt2"]
    (xl,) = [r for r in merged["rows"] if r["model"] == "gpt2-xl"]
    assert xl["levers"] == ["pad"] and len(xl["losses"]) == 2
    assert merged["command"].count("python tools/gpu_bench.py") == 2


def test_a_call_killed_while_it_builds_keeps_the_rows_built_so_far(dist_world1, tmp_path, monkeypatch):
    # A device call killed at its time limit never gets to time its rows when building them
    # (compilation on a fresh machine) takes the call's time: the file still says what was built.
    import gptx.analysis.gpu_bench
    build_row, built = gptx.analysis.gpu_bench.build_row, []

    def killed_at_the_third(row, *args):
        if len(built) == 2:
            raise KeyboardInterrupt  # as the limit's signal would
        built.append(build_row(row, *args))
    monkeypatch.setattr(gptx.analysis.gpu_bench, "build_row", killed_at_the_third)
    assert run_gpu_bench(["--levers", "pad", "--iters", "1", "--warmup", "1", "--out-dir", str(tmp_path)]) == 130
    (json_path,) = tmp_path.glob("*.json")
    rows = json.loads(json_path.read_text())["rows"]
    assert all(r["model"] == "gpt2" and r["tokens_per_sec"] is None for r in rows)  # none timed yet
    assert [r["grad_accum"] > 0 for r in rows] == [True, True] + [False] * (len(rows) - 2)  # two built


@pytest.mark.parametrize("argv, message", [
    (["--levers", "pad,turbo"], "--levers: unknown lever 'turbo'"),
    (["--models", "gpt5"], "--models: expected some of"),
    (["--precisions", "fp8"], "--precisions: expected bf16, fp16 or fp32"),
    (["--iters", "0"], "--iters: must be >= 1"),
    (["--reference", "/nonexistent/model.py"], "--reference /nonexistent/model.py"),
])
def test_bad_input_is_one_line(argv, message, capsys, tmp_path):
    assert run_gpu_bench(argv + ["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["file", "below a file", "read-only"])
def test_an_out_dir_that_cannot_be_written_is_one_line_before_measuring(where, capsys, tmp_path, monkeypatch):
    # Before: FileExistsError / NotADirectoryError / OSError tracebacks, the last after the whole run.
    import errno
    import tempfile

    import gptx.analysis.gpu_bench as gpu_bench_module
    afile = tmp_path / "afile"
    afile.write_text("kept")
    out_dir = {"file": afile, "below a file": afile / "below", "read-only": tmp_path / "ro"}[where]
    if where == "read-only":  # root ignores permission bits: a read-only disk refuses every new file
        (tmp_path / "ro").mkdir()

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(gpu_bench_module, "gpu_bench", lambda *a, **k: pytest.fail("measured before the check"))
    assert run_gpu_bench(["--levers", "pad", "--iters", "1", "--warmup", "1", "--out-dir", str(out_dir)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out-dir {out_dir}: cannot write there"), captured.err
    assert "Traceback" not in captured.err and afile.read_text() == "kept"


@pytest.mark.parametrize("device,cuda,source", [
    ("cpu", "12.4", "fp32 matmul, measured"),  # before: a CUDA build of torch on a CPU said "datasheet"
    ("cpu", None, "fp32 matmul, measured"),
    ("NVIDIA H100 80GB HBM3", "12.4", "bf16 dense, datasheet"),
])
def test_the_peak_is_labelled_by_the_device_it_ran_on(device, cuda, source):
    from gptx.analysis.gpu_bench_report import render_markdown
    report = {"device": device, "date": "2026-01-01", "torch": "2.5", "cuda": cuda, "deepspeed": "0.19",
              "iters": 2, "warmup": 1, "peak_flops": 1e12, "levers": ["pad"], "reference": "gptx layers",
              "command": "python tools/gpu_bench.py", "rows": [], "skipped": []}
    other = {"fp32 matmul, measured", "bf16 dense, datasheet"} - {source}
    markdown = render_markdown(report)
    assert f"TFLOP/s ({source})" in markdown and other.pop() not in markdown


def test_the_compiled_reference_loop_trains_a_nanogpt_style_file(dist_world1, monkeypatch):
    """The GPU command's reference row: the reference model.py compiled. torch.compile imports the
    module of the code it traces by name, and the file loaded under a name nothing imported failed
    ("No module named 'gptx_reference_nanogpt_style_model'"): the row, and gptx's ratio to it, lost."""
    import math

    from gptx.analysis.gpu_bench import build_reference_step
    from gptx.config import load_config
    from gptx.parallel import pipeline
    from tests.helpers.runs import MICRO_MODEL, REPO
    monkeypatch.setattr(pipeline, "COMPILE_BACKEND", "eager")  # dynamo's tracing, without inductor's codegen
    cfg = load_config("tiny", MICRO_MODEL)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0}
    step, _ = build_reference_step(cfg, ds, torch.device("cpu"), str(REPO / "tests/helpers/nanogpt_style_model.py"),
                                   compile_model=True, seed=0)
    assert math.isfinite(step()) and math.isfinite(step())


def test_a_row_is_built_only_while_it_and_two_timed_rounds_fit_before_the_deadline():
    """A lease's call is killed at its limit: builds that ran up to the deadline left no time to
    time any row (every row's tokens/s lost)."""
    import time
    from types import SimpleNamespace

    from gptx.analysis.gpu_bench import time_to_build
    built = [SimpleNamespace(step=object(), build_s=60.0, warm_step_s=1.5) for _ in range(3)]
    waiting = SimpleNamespace(step=None, build_s=0.0, warm_step_s=0.0)
    rows, now = built + [waiting], time.perf_counter()
    # One more build as long as the longest (60 s), then two rounds of four rows of at most 1.5 s (12 s).
    assert time_to_build(rows, waiting, now + 75) and not time_to_build(rows, waiting, now + 70)
    assert time_to_build([waiting], waiting, now + 1)  # the first row: nothing known yet
