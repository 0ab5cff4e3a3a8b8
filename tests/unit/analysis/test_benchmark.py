"""tools/benchmark.py: the engine against a plain loop, and where a pipeline's time goes."""
import json
from pathlib import Path

import pytest
import torch

from gptx.cli.benchmark import run_benchmark
from tests.helpers.runs import REPO, write_ds_config, write_model_yaml


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    return tmp, write_model_yaml(tmp / "model.yaml"), write_ds_config(tmp / "ds.json", micro=2, accum=4)


def test_engine_and_plain_loop_train_the_same_and_the_report_adds_up(dist_world1, files, capsys):
    tmp, model, ds = files
    assert run_benchmark(["--model", str(model), "--deepspeed_config", str(ds), "--iters", "3", "--warmup", "2",
                          "--plain", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    # A fair comparison trains the same thing: same layers, batches, optimizer, clipping and LR.
    assert r["engine"]["losses"] == pytest.approx(r["plain"]["losses"], abs=1e-5)
    assert r["global_batch"] == 8 and r["grad_accum"] == 4 and r["pipe_parallel_size"] == 1
    for loop in ("engine", "plain"):
        assert r[loop]["tokens_per_sec"] > 0 and 0 < r[loop]["mfu"] < 1
        # The same median iteration as iteration_s (before: the mean, so the two disagreed on which loop was faster).
        assert r[loop]["tokens_per_sec"] * r[loop]["iteration_s"] == pytest.approx(8 * 32)
    assert r["engine_over_plain_time"] == pytest.approx(r["engine"]["iteration_s"] / r["plain"]["iteration_s"])
    assert r["theoretical_bubble"] == 0
    (stage,) = r["stages"]
    seconds = stage["seconds"]
    assert seconds["forward"] > 0 and seconds["backward"] > 0 and seconds["optimizer"] > 0
    assert seconds["send/recv"] == 0  # one stage sends nothing
    # The instruction timers account for the iteration: none counted twice, none left out.
    timed = sum(v for k, v in seconds.items() if k != "other")
    assert 0.5 * stage["iteration_s"] < timed <= stage["iteration_s"]
    assert 0 < stage["memory_growth_bytes"] < stage["memory_bytes"]  # the engine's share, without the libraries


@pytest.mark.parametrize("flag", ["--warmup", "--breakdown-iters"])
def test_no_warm_up_or_no_breakdown_is_one_line(files, capsys, flag):
    # Before: accepted; the peak memory was read before any step, the breakdown printed "other 0.0 ms (100%)".
    assert run_benchmark(["--model", str(files[1]), "--deepspeed_config", str(files[2]), flag, "0"]) == 2
    assert f"{flag}: must be >= 1, got 0" in capsys.readouterr().err


def test_plain_comparison_needs_one_rank(files, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert run_benchmark(["--model", str(files[1]), "--deepspeed_config", str(files[2]), "--plain"]) == 2
    assert "--plain compares with a single-process loop" in capsys.readouterr().err


def test_the_no_pipeline_mode_is_refused_in_one_line(files, capsys):
    # Before: `world % 0` (a ZeroDivisionError traceback).
    assert run_benchmark(["--model", str(files[1]), "--deepspeed_config", str(files[2]),
                          "--pipe-parallel-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pipe-parallel-size 0: this tool measures the pipeline engine" in err[0]


def test_mfu_of_fp32_on_a_gpu_uses_the_tf32_peak_when_tf32_is_on():
    # On an H100, gpu_check's TF32 run reported an MFU of 149% against the plain-fp32 peak.
    from gptx.model.flops import gpu_peak
    assert gpu_peak("NVIDIA H100 80GB HBM3", "fp32", tf32=True) == 494.7e12
    assert gpu_peak("NVIDIA H100 80GB HBM3", "fp32", tf32=False) == 67e12
    assert gpu_peak("NVIDIA H100 80GB HBM3", "bf16", tf32=True) == 989e12
    assert gpu_peak("Tesla V100-SXM2-16GB", "fp32", tf32=True) == 15.7e12  # no TF32 on Volta
    assert gpu_peak("an unknown card", "fp32", tf32=True) is None


def test_peak_flops_reads_whether_torch_allows_tf32(monkeypatch):
    import torch

    from gptx.model.flops import peak_flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    matmul = torch.backends.cuda.matmul  # a module object monkeypatch cannot patch
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        assert peak_flops("cuda", "fp32") == 494.7e12
        matmul.allow_tf32 = False
        assert peak_flops("cuda", "fp32") == 67e12
    finally:
        matmul.allow_tf32 = before


NANOGPT_STYLE = str(REPO / "tests" / "helpers" / "nanogpt_style_model.py")


def test_reference_models_start_from_gptxs_weights_and_train_the_same(dist_world1, files, capsys):
    pytest.importorskip("transformers")
    tmp, model, ds = files
    assert run_benchmark(["--model", str(model), "--deepspeed_config", str(ds), "--iters", "3", "--warmup", "1",
                          "--plain", "--reference", "hf", "--reference", NANOGPT_STYLE, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["references"]) == {"hf", NANOGPT_STYLE}
    for name, ref in r["references"].items():
        # Same weights, batches, optimizer and LR: only the arithmetic's order differs.
        assert ref["losses"] == pytest.approx(r["plain"]["losses"], abs=1e-5), name
        assert ref["engine_speedup"] == pytest.approx(ref["iteration_s"] / r["engine"]["iteration_s"])


@pytest.mark.parametrize("reference,needle", [
    ("nowhere/model.py", "--reference nowhere/model.py: expected 'hf' or the path of a nanoGPT-style model.py"),
    (__file__, "cannot build GPT(GPTConfig(...)) from it (AttributeError"),
])
def test_a_bad_reference_is_one_line_before_anything_runs(files, capsys, reference, needle):
    assert run_benchmark(["--model", str(files[1]), "--deepspeed_config", str(files[2]),
                          "--reference", reference]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_a_reference_that_is_not_a_python_file_is_one_line(files, capsys):
    # Before: importlib found no loader for model.yaml, an AttributeError traceback about 'loader'.
    model_yaml = str(files[1])
    assert run_benchmark(["--model", model_yaml, "--deepspeed_config", str(files[2]), "--plain",
                          "--reference", model_yaml]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --reference {model_yaml}: expected 'hf'"), captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("reference,tied", [(NANOGPT_STYLE, True), ("hf", True), ("hf", False)])
def test_references_multiply_the_whole_padded_table_that_gptx_does(reference, tied):
    """Same matmul shapes as gptx: the reference's head is the padded table, copied whole."""
    from gptx.analysis.references import load_reference
    from gptx.config import load_config
    from gptx.model.gpt import GPT
    if reference == "hf":
        pytest.importorskip("transformers")
    cfg = load_config(None, dict(vocab_size=250, pad_vocab_to_multiple=64, n_layer=2, n_head=2, n_embd=16,
                                 seq_len=8, tie_embeddings=tied))
    assert cfg.model.padded_vocab_size == 256
    gptx_model = GPT(cfg.model, seed=0)
    model, _ = load_reference(reference, cfg, gptx_model)
    head = model.lm_head.weight
    assert head.shape == (256, 16)
    source = gptx_model.layers["0"].wte.weight if tied else gptx_model.layers[str(3 + 2)].lm_head.weight
    assert torch.equal(head, source)  # the padding rows too
    logits = model(torch.zeros(1, 8, dtype=torch.long))
    logits = logits.logits if reference == "hf" else logits[0]
    assert logits.shape[-1] == 256


def _counting_data(path: Path, vocab: int) -> Path:
    """A stream that counts 0..49 over and over: one window predicts the next token exactly."""
    import numpy as np
    path.mkdir()
    for split in ("train", "val"):
        np.tile(np.arange(50, dtype=np.uint16), 200).tofile(path / f"{split}.bin")
    (path / "meta.json").write_text(json.dumps({"vocab_size": vocab, "dtype": "uint16"}))
    return path


@pytest.mark.parametrize("reference", [NANOGPT_STYLE, "hf"])
def test_reference_run_trains_the_reference_on_the_data_and_times_every_step(files, tmp_path, capsys, reference):
    import math

    from gptx.cli.reference_run import run_reference_run
    if reference == "hf":
        pytest.importorskip("transformers")
    data = _counting_data(tmp_path / "data", 256)
    losses = []
    for fused in ([], ["--fused-adamw"]):
        assert run_reference_run([reference, "--model", str(files[1]), "--data", str(data), "--iters", "16",
                                  "--skip", "2", "--lr", "1e-2", "--batch-size", "4", "--json", *fused]) == 0
        r = json.loads(capsys.readouterr().out)
        assert len(r["seconds"]) == len(r["losses"]) == 16 and r["tokens_per_iteration"] == 4 * 32
        assert r["tokens_per_sec"] == pytest.approx(4 * 32 * 14 / sum(r["seconds"][2:]))
        # From ln 256 to at most the entropy of the 50 tokens the data holds (below it once the model
        # uses the order they come in): it reads train.bin's tokens.
        assert r["losses"][0] > 5.3 and sum(r["losses"][-4:]) / 4 < math.log(50) + 0.15, r["losses"]
        losses.append(r["losses"])
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)  # fused AdamW: the same groups and update


@pytest.mark.parametrize("args,needle", [
    (["nowhere/model.py"], "reference_run nowhere/model.py: expected 'hf' or the path of a nanoGPT-style model.py"),
    ([NANOGPT_STYLE, "--iters", "5", "--skip", "5"], "--skip: must be at least 0 and less than --iters (5)"),
    ([NANOGPT_STYLE, "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    ([NANOGPT_STYLE, "--data", "nowhere"], "--data 'nowhere': not a directory"),
    ([NANOGPT_STYLE, "--set", "vocab_size=40"], "tokenized with a 256-token vocabulary, but model.vocab_size is 40"),
    (["hf", "--set", "norm=rmsnorm"], "reference_run hf: only a GPT-2-architecture model has references"),
])
def test_reference_run_refuses_bad_input_in_one_line(files, tmp_path, capsys, args, needle):
    from gptx.cli.reference_run import run_reference_run
    data = _counting_data(tmp_path / "data", 256) if "--data" not in args else None
    assert run_reference_run([*args, "--model", str(files[1]), *(["--data", str(data)] if data else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_the_hf_reference_without_transformers_is_one_line(files, tmp_path, capsys, monkeypatch):
    import sys

    from gptx.cli.reference_run import run_reference_run
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an environment without it imports
    data = _counting_data(tmp_path / "data", 256)
    assert run_reference_run(["hf", "--model", str(files[1]), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: reference_run hf needs transformers (pip install transformers; gptx's [dev] extra has it)"]


@pytest.mark.parametrize("schedule,bubble", [
    ("1f1b", 3 / 7),     # (p - 1) / (m + p - 1) at p = m = 4
    ("zb-h1", 3 / 15),   # (p - 1) / (3m + p - 1): the weight passes fill most of the idle time
])
def test_the_theoretical_bubble_is_the_configured_schedules(dist_world1, schedule, bubble):
    # Before: 1F1B's formula under --set pipeline_schedule=zb-h1 too, more than twice the bubble.
    from gptx.analysis.benchmark import BenchSettings, add_speeds, render_text
    from gptx.config import load_config
    from gptx.parallel.ds_config import BatchLayout
    cfg = load_config("tiny", {"pipeline_schedule": schedule, "pipe_parallel_size": 4})
    report = {"accelerator": "cpu", "model": "tiny", "device_name": "cpu", "seq_len": cfg.model.seq_len,
              "memory_kind": "RSS", "stages": []}
    add_speeds(report, cfg, {}, BatchLayout(micro_batch=1, grad_accum=4, dp_size=1), BenchSettings(), 4,
               {"engine": ([1.0], [1.0])})
    assert report["theoretical_bubble"] == pytest.approx(bubble)
    assert f"theoretical bubble of the {schedule} schedule" in render_text(report)
