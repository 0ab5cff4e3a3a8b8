"""The engine and its DeepSpeed workarounds: fp16 (DeepSpeed's real fp16 optimizers on CPU, via
GPTX_CPU_FP16=1) and bf16 against fp32 on the same batches, overflow handling, resume, and what
fp16 checkpoints give the tools.

Tolerance: fp16 losses must stay within 1e-3 of fp32's over 8 steps. Correct fp16 stays
within 1e-4 here (fp16 rounding of weights and activations); each DeepSpeed defect that
gptx works around moves the loss by 0.007 to 0.02 on the same run, so removing any one
workaround fails these tests. The logged grad norm must be fp32's to 1%. bf16 (8 bits of
mantissa against fp16's 11) stays within 7.3e-4 of fp32 here; its tolerance is 3e-3.
"""
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from gptx.analysis.precision_check import max_loss_diff, max_norm_rel_diff, train_trace
from gptx.cli.convert import run_convert
from gptx.cli.pretrain import run_pretrain
from gptx.config import load_config
from gptx.data.tokens import open_tokens
from gptx.parallel import engine as engine_module
from gptx.testing import CPU_FP16_ENV
from gptx.training.checkpoint_files import layer_file
from gptx.training.consolidate import load_plain_model, resolve_checkpoint
from tests.helpers.runs import MICRO_MODEL, make_token_dir, precision_ds, pretrain_args, read_metrics, train_losses

ITERS = 8


LOSS_TOL = 1e-3


NORM_TOL = 1e-2


BF16_LOSS_TOL = 3e-3


BF16_NORM_TOL = 5e-2


@pytest.fixture(scope="module")
def cpu_fp16():
    before = os.environ.get(CPU_FP16_ENV)
    os.environ[CPU_FP16_ENV] = "1"
    yield
    if before is None:
        os.environ.pop(CPU_FP16_ENV)
    else:
        os.environ[CPU_FP16_ENV] = before


@pytest.fixture(scope="module")
def setup(dist_world1, cpu_fp16, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    data = make_token_dir(tmp / "data")
    cfg = load_config(None, dict(MICRO_MODEL, lr=3e-3, warmup_iters=1, train_iters=ITERS, pipe_parallel_size=1))
    tokens = open_tokens(data, "train")
    (tmp / "model.yaml").write_text(yaml.safe_dump(MICRO_MODEL))
    (tmp / "check.yaml").write_text(yaml.safe_dump(dict(MICRO_MODEL, lr=3e-3, warmup_iters=1)))
    return cfg, tokens, tmp, data


@pytest.fixture(scope="module")
def fp32(setup):
    cfg, tokens, *_ = setup
    return train_trace(cfg, precision_ds("fp32"), tokens, ITERS)


# (optimizer path, loss-scale keys): static scales 2^8..2^16, dynamic from 2^12 with a window of 2
# (the scale grows on steps 3 and 6, where DeepSpeed would unscale by the new scale).
CASES = [
    ("fp16-zero0-torch", dict(loss_scale=2 ** 8)),
    ("fp16-zero0-torch", dict(loss_scale=2 ** 16)),
    ("fp16-zero0-torch", dict(initial_scale_power=12, loss_scale_window=2)),
    ("fp16-zero0-fused", dict()),
    ("fp16-zero0-fused", dict(initial_scale_power=12, loss_scale_window=2)),
    ("fp16-zero1-fused", dict()),
    ("fp16-zero1-torch", dict(loss_scale=2 ** 12)),
    ("fp16-zero1-torch", dict(initial_scale_power=12, loss_scale_window=2)),
]


@pytest.mark.parametrize("name,scaling", CASES, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in s.items()) or 'default'}"
                                                    for n, s in CASES])
def test_fp16_follows_fp32_on_the_same_batches(setup, fp32, name, scaling):
    cfg, tokens, *_ = setup
    trace = train_trace(cfg, precision_ds(name, **scaling), tokens, ITERS)
    assert trace.skipped[-1] == 0
    assert max_loss_diff(fp32, trace) < LOSS_TOL, (fp32.losses, trace.losses)
    assert max_norm_rel_diff(fp32, trace) < NORM_TOL, (fp32.grad_norms, trace.grad_norms)
    if scaling.get("loss_scale_window") == 2:
        assert trace.scales[-1] >= 2 ** 14  # it grew, at least twice: the steps DeepSpeed unscales wrongly


def test_bf16_follows_fp32_on_the_same_batches(setup, fp32):
    cfg, tokens, *_ = setup
    trace = train_trace(cfg, precision_ds("bf16"), tokens, ITERS)
    assert max_loss_diff(fp32, trace) < BF16_LOSS_TOL, (fp32.losses, trace.losses)
    assert max_norm_rel_diff(fp32, trace) < BF16_NORM_TOL


def test_a_scale_that_overflows_comes_down_and_then_trains_like_fp32(setup):
    # 2^20 overflows on the first steps of this model (its largest gradient is above 65504 / 2^20).
    cfg, tokens, *_ = setup
    trace = train_trace(cfg, precision_ds("fp16-zero0-torch", initial_scale_power=20, hysteresis=1),
                        tokens, ITERS)
    lead = next(i for i, skipped in enumerate(trace.skipped) if skipped == i)  # the first applied step
    assert 1 <= lead <= 4 and trace.scales[lead] == 2 ** (20 - lead)
    later = [i for i in range(lead, ITERS) if trace.skipped[i] > lead]  # the next overflow, if any
    stop = later[0] + 1 if later else ITERS
    assert stop - lead >= 3 and trace.skipped[-1] <= ITERS // 2
    # A skipped step changes nothing but the data position (not the weights, not the LR
    # schedule): until the next overflow the run is fp32's from that data position.
    reference = train_trace(cfg, precision_ds("fp32"), tokens, stop - lead, skip_batches=lead)
    assert max(abs(a - b) for a, b in zip(trace.losses[lead:stop], reference.losses)) < LOSS_TOL
    assert trace.lrs[lead:stop - 1] == pytest.approx(reference.lrs[:stop - 1 - lead])


@pytest.mark.parametrize("name", ["fp16-zero0-torch", "fp16-zero1-torch"])
def test_a_forced_overflow_skips_the_step_and_training_recovers(setup, name):
    cfg, tokens, *_ = setup
    seen = {}

    def before_step(engine, it):
        params = list(engine.module.parameters())
        if it == 3:  # overflows at iterations 3 and 4: two in a row use up hysteresis 2
            seen["before"] = [p.detach().clone() for p in params]
            seen["hook"] = params[0].register_hook(lambda g: g * float("inf"))
        elif it == 5:
            seen.pop("hook").remove()
            seen["after"] = [p.detach().clone() for p in params]

    trace = train_trace(cfg, precision_ds(name, initial_scale_power=12), tokens, ITERS, before_step)
    assert trace.skipped == [0, 0, 1, 2, 2, 2, 2, 2]
    assert all(torch.equal(a, b) for a, b in zip(seen["before"], seen["after"]))  # weights untouched by both
    assert trace.lrs[1] == trace.lrs[2] == trace.lrs[3]  # the LR schedule did not advance
    # DeepSpeed's ZeRO scaler honours hysteresis 2 (halves at the second overflow); its
    # ZeRO-0 fp16 optimizers ignore hysteresis and halve at each.
    expected = [2 ** 12, 2 ** 12, 2 ** 11, 2 ** 10] if "zero0" in name else [2 ** 12, 2 ** 12, 2 ** 12, 2 ** 11]
    assert trace.scales[:4] == expected
    assert trace.losses[-1] < trace.losses[4] and all(n is not None and n < 10 for n in trace.grad_norms[4:])


def test_a_loss_gradient_neither_scaled_nor_unscaled_stops_the_run(setup):
    """The loss hook multiplies by the scale only when DeepSpeed did not. Under ZeRO DeepSpeed
    scales the loss itself and the hook must leave it alone: the ZeRO-1 cases above follow
    fp32 with the hook in place. Here: a factor that is neither is refused, not trained on."""
    cfg, tokens, *_ = setup

    def before_step(engine, it):
        if it == 2:  # a DeepSpeed that multiplied the loss by something else
            engine.module.loss_fn = (lambda fn: lambda out, labels: fn(out, labels) * 3.0)(engine.module.loss_fn)

    with pytest.raises(engine_module.LossScalingError, match="neither 1 nor the loss scale 65536"):
        train_trace(cfg, precision_ds("fp16-zero0-torch"), tokens, 3, before_step)


def test_a_tied_weight_broadcast_with_autograd_on_warns_but_leaves_gradients_right(dist_world1):
    """Defect 7 as torch sees it: PipelineModule broadcasts the tied embedding (a parameter
    that requires grad) with autograd on. torch warns at the next backward; the gradient is
    still the one without the broadcast, and under no_grad (gptx's workaround) nothing warns.
    The 2-stage runs of tests/integration/test_train.py check the console and the parity with 1 stage."""
    import warnings

    import torch.distributed as dist
    w, x = torch.nn.Parameter(torch.randn(4, 3)), torch.randn(2, 4)
    expected = 2 * x.T @ (x @ w).detach()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist.broadcast(w, src=0)
        (x @ w).pow(2).sum().backward()
    assert any("c10d::broadcast_" in str(c.message) for c in caught)  # still so in this torch
    assert w.is_leaf and w.grad_fn is None and torch.allclose(w.grad, expected)
    fresh = torch.nn.Parameter(w.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            dist.broadcast(fresh, src=0)
        (x @ fresh).pow(2).sum().backward()
    assert torch.allclose(fresh.grad, expected)


def test_shared_memory_buffers_of_a_run_are_removed_and_no_others():
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this machine")
    port = "29999"
    mine = shm / f"deepspeed_allreduce_buffer_0_{port}_0"
    other = shm / f"deepspeed_allreduce_buffer_0_{int(port) + 1}_0"
    mine.write_bytes(b"x")
    other.write_bytes(b"x")
    try:
        engine_module.release_shared_memory(port)
        assert not mine.exists() and other.exists()
    finally:
        other.unlink(missing_ok=True)
        mine.unlink(missing_ok=True)


def write_ds(tmp, name, ds):
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(ds))
    return path


def fp16_run(setup, save, name, iters, *extra, **scaling):
    cfg, tokens, tmp, data = setup
    model = tmp / "model.yaml"
    ds = write_ds(tmp, f"{save.name}-ds", precision_ds(name, **scaling))
    return run_pretrain(pretrain_args(data, model, ds, save, 1, iters, "--eval-interval", "0", "--log-interval", "1",
                                      *extra))


def test_fp16_without_zero_scales_the_loss_through_a_batch_ramp(setup):
    """The loss-scaling check (defect 2) reads the accumulation steps at every step: with the
    count fixed at build time, the ramp's first larger step would look neither scaled nor not."""
    tmp = setup[2]
    full = tmp / "fp16-ramp"
    ds = write_ds(tmp, "fp16-ramp-ds", precision_ds("fp16-zero0-torch", micro=2, accum=4))
    assert run_pretrain(pretrain_args(setup[3], tmp / "model.yaml", ds, full, 1, 5, "--eval-interval", "0",
                                      "--rampup-batch-size", "4,4,8")) == 0
    records = [r for r in read_metrics(full) if "loss" in r]
    assert [r["batch_size"] for r in records] == [4, 4, 8, 8, 8]
    assert records[-1]["loss"] < records[0]["loss"]


@pytest.mark.parametrize("name", ["fp16-zero0-torch", "fp16-zero1-torch"])
def test_fp16_resume_is_exact_with_the_loss_scale_and_skips_restored(setup, name):
    tmp = setup[2]
    scaling = dict(initial_scale_power=20, loss_scale_window=2, hysteresis=1)  # skips, then grows
    full, part = tmp / f"full-{name}", tmp / f"part-{name}"
    assert fp16_run(setup, full, name, 8, **scaling) == 0
    assert fp16_run(setup, part, name, 8, "--exit-interval", "5", **scaling) == 0
    assert fp16_run(setup, part, name, 8, "--load", str(part), **scaling) == 0
    records = lambda run: {r["iter"]: (r["loss"], r["loss_scale"], r["skipped_steps"])
                           for r in read_metrics(run) if "loss" in r}
    a, b = records(full), records(part)
    assert a == b, (a, b)
    assert a[5][2] >= 1 and a[8][1] != a[5][1]  # skips before the checkpoint; the scale moved after it


@pytest.mark.parametrize("name", ["fp16-zero0-torch", "fp16-zero0-fused", "fp16-zero1-torch"])
def test_master_weights_and_hf_export_from_a_real_fp16_checkpoint(setup, name):
    tmp = setup[2]
    run = tmp / f"masters-{name}"
    assert fp16_run(setup, run, name, 4) == 0
    masters, _ = load_plain_model(run, master_weights=True)
    halves, _ = load_plain_model(run)
    folder = resolve_checkpoint(run)
    differ = total = 0
    assert masters.state_dict().keys() == halves.state_dict().keys()
    for key, m in masters.state_dict().items():
        h = halves.state_dict()[key]
        assert torch.equal(m.half().float(), h), key  # the fp16 weights are the masters, rounded
        differ += int((m != h).sum())
        total += m.numel()
    assert differ > total / 2  # and the masters carry more bits than that
    assert torch.load(layer_file(folder, 2), weights_only=True)["attn.c_attn.weight"].dtype == torch.float16
    out = tmp / f"hf-{name}"
    assert run_convert(["--load", str(run), "--to-hf", str(out), "--master-weights"]) == 0
    from gptx.interop.hf import read_safetensors
    exported = read_safetensors(out / "model.safetensors")
    assert torch.equal(exported["transformer.h.0.attn.c_attn.weight"],  # GPT-2's Conv1D is transposed
                       masters.state_dict()["layers.2.attn.c_attn.weight"].t())
    # The other tools read the same checkpoint.
    from gptx.cli.evaluate import run_evaluate
    from gptx.cli.sample import run_sample
    assert run_evaluate(["--load", str(run), "--data", str(setup[3]), "--master-weights", "--json"]) == 0
    assert run_sample(["--load", str(run), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--greedy",
                       "--json"]) == 0


def test_benchmark_runs_the_fp16_engine_beside_an_autocast_loop(setup, capsys):
    from gptx.cli.benchmark import run_benchmark
    tmp = setup[2]
    ds = write_ds(tmp, "bench-fp16", precision_ds("fp16-zero0-torch"))
    capsys.readouterr()
    assert run_benchmark(["--model", str(tmp / "check.yaml"), "--deepspeed_config", str(ds), "--iters", "3",
                          "--warmup", "1", "--plain", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    # Not the same arithmetic (16-bit weights vs autocast over fp32 weights), the same training.
    assert r["engine"]["losses"] == pytest.approx(r["plain"]["losses"], abs=1e-2)


@pytest.mark.parametrize("scaling", [dict(initial_scale_power=20, min_loss_scale=2 ** 20, hysteresis=1),
                                     dict(loss_scale=2 ** 20)])  # dynamic, held at its floor; static
def test_the_overflow_streak_stop_fires_in_a_real_fp16_run(setup, capsys, scaling):
    tmp = setup[2]
    run = tmp / f"streak-{len(scaling)}"
    # Every step overflows at 2^20 on this model, and the scale may not come down.
    code = fp16_run(setup, run, "fp16-zero0-torch", 8, "--max-skipped-at-min-scale", "3", **scaling)
    assert code == 2
    err = capsys.readouterr().err
    assert "iteration 3: 3 fp16 steps in a row overflowed at the minimum loss scale 1.04858e+06" in err
    assert not train_losses(run).get(4)


def test_gpu_check_reports_the_three_precisions_side_by_side(setup, capsys):
    from gptx.cli.gpu_check import run_gpu_check
    tmp, data = setup[2], setup[3]
    model = tmp / "check.yaml"
    capsys.readouterr()
    assert run_gpu_check(["--model", str(model), "--data", str(data), "--iters", "8", "--micro-batch", "2",
                          "--accum", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    configs = report["configs"]
    assert list(configs) == ["fp32", "fp16", "bf16"]
    assert configs["fp32"]["max_loss_diff"] == 0.0
    assert configs["fp16"]["max_loss_diff"] < LOSS_TOL and configs["fp16"]["skipped_steps"] == 0
    assert configs["fp16"]["final_loss_scale"] == 2 ** 16  # the shipped gpu_fp16.json's initial scale
    assert configs["bf16"]["max_loss_diff"] < BF16_LOSS_TOL
    assert all(c["tokens_per_sec"] > 0 and len(c["peak_memory_per_stage_gib"]) == 1 for c in configs.values())


def test_gpu_check_refuses_fp16_on_cpu_without_the_switch(dist_world1, monkeypatch, capsys):
    from gptx.cli.gpu_check import run_gpu_check
    monkeypatch.delenv(CPU_FP16_ENV, raising=False)
    assert run_gpu_check(["--model", "tiny", "--iters", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp16 is not supported by DeepSpeed's CPU accelerator" in err[0]


def test_deepspeed_jit_builds_parse_an_arch_list_with_a_family_suffix(monkeypatch):
    """Defect 8, on CPU: DeepSpeed's JIT builder fails on "9.0a"; under gptx's context it does not."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder
    builder = FusedAdamBuilder()
    builder.jit_mode = True
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 10.0f+PTX")
    with engine_module._arch_list_deepspeed_can_parse():
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;10.0+PTX"
        builder.compute_capability_args()  # raises ValueError where the workaround is missing
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0a 10.0f+PTX"
    try:
        builder.compute_capability_args()
    except ValueError as e:  # the defect is still there: the workaround is needed
        assert "0a" in str(e)
    else:
        pytest.skip("this DeepSpeed parses architecture suffixes: defect 8's workaround can go")


def offload_ds(name: str, **kwargs) -> dict:
    """precision_ds with the optimizer on the host: DeepSpeedCPUAdam (it compiles on first use)."""
    ds = precision_ds(name, **kwargs)
    ds["optimizer"]["params"].pop("torch_adam", None)
    ds["zero_optimization"] = {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    return ds


@pytest.mark.parametrize("name", ["fp32", "fp16-zero1-torch", "bf16"])
def test_optimizer_offload_through_the_pipeline_follows_fp32(setup, fp32, name):
    cfg, tokens, *_ = setup
    trace = train_trace(cfg, offload_ds(name), tokens, ITERS)
    tol = {"fp32": 1e-5, "bf16": BF16_LOSS_TOL}.get(name, LOSS_TOL)  # fp32: DeepSpeedCPUAdam is AdamW's math
    assert max_loss_diff(fp32, trace) < tol, (fp32.losses, trace.losses)
    assert trace.skipped[-1] == 0


def test_an_offloaded_fp16_run_resumes_exactly_and_exports_its_master_weights(setup):
    cfg, tokens, tmp, data = setup
    ds = write_ds(tmp, "offload-ds", offload_ds("fp16-zero1-torch"))
    full, part = tmp / "offload-full", tmp / "offload-part"
    flags = ("--eval-interval", "0", "--log-interval", "1")
    assert run_pretrain(pretrain_args(data, tmp / "model.yaml", ds, full, 1, 4, *flags)) == 0
    assert run_pretrain(pretrain_args(data, tmp / "model.yaml", ds, part, 1, 4, *flags, "--exit-interval", "2")) == 0
    assert run_pretrain(pretrain_args(data, tmp / "model.yaml", ds, part, 1, 4, *flags, "--load", str(part))) == 0
    assert train_losses(part) == train_losses(full) and len(train_losses(full)) == 4
    masters, _ = load_plain_model(full, master_weights=True)
    halves, _ = load_plain_model(full)
    assert masters.state_dict().keys() == halves.state_dict().keys()
    for key, m in masters.state_dict().items():
        h = halves.state_dict()[key]
        assert torch.equal(m.half().float(), h), key  # the fp16 weights are the host masters, rounded
    out = tmp / "offload-hf"
    assert run_convert(["--load", str(full), "--to-hf", str(out), "--master-weights"]) == 0
    from gptx.interop.hf import read_safetensors
    exported = read_safetensors(out / "model.safetensors")
    assert torch.equal(exported["transformer.h.0.attn.c_attn.weight"],
                       masters.state_dict()["layers.2.attn.c_attn.weight"].t())


def test_deepspeed_op_loads_ask_py_cpuinfo_once_per_process(monkeypatch):
    """Defect 9: a JIT op load asks py-cpuinfo twice even when the op is built; under gptx's
    cache the process asks once, whatever loads follow."""
    import cpuinfo
    from deepspeed.ops.op_builder.builder import OpBuilder
    from deepspeed.ops.op_builder.cpu import FusedAdamBuilder
    asked = []
    real = cpuinfo.get_cpu_info

    def counted():
        asked.append(1)
        return real()
    monkeypatch.setattr(cpuinfo, "get_cpu_info", counted)
    monkeypatch.setattr(OpBuilder, "_loaded_ops", {})  # as in a fresh process
    FusedAdamBuilder().load(verbose=False)
    defect_still_there = len(asked) > 1
    engine_module._ask_py_cpuinfo_once()
    asked.clear()
    monkeypatch.setattr(OpBuilder, "_loaded_ops", {})
    FusedAdamBuilder().load(verbose=False)
    monkeypatch.setattr(OpBuilder, "_loaded_ops", {})
    FusedAdamBuilder().load(verbose=False)
    assert len(asked) == 1
    if not defect_still_there:
        pytest.skip("this DeepSpeed asks py-cpuinfo once per op load: defect 9's workaround can go")
