import torch

from gptx.config import ModelConfig, load_config
from gptx.model.gpt import GPT, layer_specs
from gptx.parallel.pipeline import build_pipeline, compile_blocks, count_layer_params
from tests.helpers.runs import MICRO_MODEL


def test_pipeline_module_and_plain_model_give_identical_logits(dist_world1):
    cfg = load_config("tiny", {**MICRO_MODEL, "pipe_parallel_size": 1, "seed": 3})
    pipe = build_pipeline(cfg).eval()
    plain = GPT(cfg.model, seed=3).eval()
    idx = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len))
    with torch.no_grad():
        assert torch.equal(pipe(idx), plain(idx))


def test_untied_pipeline_matches_too(dist_world1):
    cfg = load_config("tiny", {**MICRO_MODEL, "pipe_parallel_size": 1, "tie_embeddings": False})
    pipe = build_pipeline(cfg).eval()
    plain = GPT(cfg.model, seed=cfg.train.seed).eval()
    idx = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len))
    with torch.no_grad():
        assert torch.equal(pipe(idx), plain(idx))


def test_meta_device_counts_equal_real_counts():
    cfg = load_config("tiny", MICRO_MODEL)
    specs = layer_specs(cfg.model, seed=0)
    real = [sum(p.numel() for p in spec.build().parameters()) for spec in specs]
    assert count_layer_params(specs) == real


def test_counting_the_largest_preset_allocates_nothing():
    cfg = load_config("gpt3-175b")
    counts = count_layer_params(layer_specs(cfg.model, seed=0))
    assert sum(counts) > 174e9


def test_compiled_blocks_compute_what_eager_blocks_do():
    cfg = ModelConfig(vocab_size=101, seq_len=16, n_layer=2, n_head=2, n_embd=24)
    eager, compiled = GPT(cfg, seed=0), GPT(cfg, seed=0)
    assert compile_blocks(compiled.layers.values()) == cfg.n_layer
    assert "forward" in vars(compiled.layers["2"]) and "forward" not in vars(eager.layers["2"])
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    a, b = eager(idx), compiled(idx)
    assert torch.allclose(a, b, atol=1e-5)
    a.square().mean().backward()
    b.square().mean().backward()
    for p, q in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6)
