"""lm-evaluation-harness on gptx checkpoints, offline: local tasks over JSON files written here.

The adapter's numbers are checked three ways: against gptx's own forward pass on the same
tokens, against gptx's evaluator for perplexity, and (plain GPT-2 shape) against lm-eval's
`hf` model on the `convert.py --to-hf` export.
"""
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gptx.cli.convert import run_convert
from gptx.config import Config, ModelConfig
from gptx.data.tokens import GPT2_EOT, gpt2_encoding
from gptx.errors import ConfigError
from gptx.interop.evaluate import evaluate_tokens
from gptx.model.gpt import GPT
from gptx.training.consolidate import save_weights_only

lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")

SHAPE = dict(vocab_size=50257, seq_len=32, n_layer=2, n_head=2, n_embd=16)
LONG_TEXT = ("The harbour was quiet in the early morning, and the boats rocked gently against the pier while "
             "the fishermen mended their nets and talked about the weather, the price of fuel and the new "
             "lighthouse keeper, who had arrived from the city with three crates of books and a grey cat.")
LASTWORD = [{"text": "The cat sat on the mat and looked at the", "target": "dog"},
            {"text": "Water boils at one hundred degrees", "target": "Celsius"},
            {"text": LONG_TEXT + " In the evening the keeper lit the", "target": "lamp"}]  # longer than the window
CHOICE = [{"question": "The sky on a clear day is", "choices": ["blue", "green", "loud"], "label": 0},
          {"question": "Two plus two equals", "choices": ["three", "four"], "label": 1}]
ROLLING = [{"page": LONG_TEXT}, {"page": "Short text."}]
GENERATE = [{"prompt": "Once upon a time", "answer": "there"}]


def task_yaml(name: str, data: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    runs = {}
    for name, variant in (("plain", {}), ("alibi", dict(position_embedding="alibi", residual="parallel"))):
        model = GPT(ModelConfig(**SHAPE, **variant), seed=3)
        layers = {int(i): layer.state_dict() for i, layer in model.layers.items()}
        save_weights_only(layers, Config(model=model.cfg), tmp / name, source="test")
        runs[name] = tmp / name
    assert run_convert(["--load", str(runs["plain"]), "--to-hf", str(tmp / "hf")]) == 0
    tasks = tmp / "tasks"
    tasks.mkdir()
    for name, rows in (("lastword", LASTWORD), ("choice", CHOICE), ("rolling", ROLLING), ("generate", GENERATE)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "lastword.yaml").write_text(task_yaml("gptx_lastword", tmp / "lastword.jsonl", """\
output_type: loglikelihood
doc_to_text: "{{text}}"
doc_to_target: " {{target}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
"""))
    (tasks / "choice.yaml").write_text(task_yaml("gptx_choice", tmp / "choice.jsonl", """\
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""))
    (tasks / "rolling.yaml").write_text(task_yaml("gptx_rolling", tmp / "rolling.jsonl", """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{page}}"
metric_list:
  - {metric: word_perplexity}
  - {metric: byte_perplexity}
  - {metric: bits_per_byte}
"""))
    (tasks / "generate.yaml").write_text(task_yaml("gptx_generate", tmp / "generate.jsonl", """\
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: " {{answer}}"
generation_kwargs: {until: ["\\n", "."], max_gen_toks: 5, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
"""))
    return tmp, runs


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


@pytest.fixture
def local_tasks_only(monkeypatch):
    """lm-eval's command line indexes every built-in task's YAML (seconds) before it reads
    --include_path; these tests' tasks are all local, so its TaskManager skips the built-ins."""
    import functools

    import lm_eval.tasks
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                        include_defaults=False))


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def own_loglikelihood(model, context: str, continuation: str, window: int) -> tuple[float, bool]:
    """gptx's forward pass on the same text: the continuation's tokens are those the whole text
    has after the context's (lm-eval's convention), and the window keeps the last tokens."""
    enc = gpt2_encoding()
    ctx = enc.encode_ordinary(context)
    whole = enc.encode_ordinary(context + continuation)
    cont = whole[len(ctx):]
    tokens = torch.tensor(whole[-(window + 1):])
    with torch.no_grad():
        logp = F.log_softmax(model(tokens[None, :-1])[0], dim=-1)[-len(cont):]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_loglikelihoods_equal_gptxs_own_forward_pass(setup):
    from gptx.interop.lm_eval_adapter import GptxLM
    from gptx.training.consolidate import load_plain_model
    _, runs = setup
    for name, window in (("plain", 32), ("alibi", 64)):
        lm = GptxLM(load=str(runs[name]), batch_size=2, max_length=window)
        model, _ = load_plain_model(runs[name])
        model.eval()
        with torch.no_grad():  # a continuation the model would produce itself: greedy is true
            enc = gpt2_encoding()
            favourite = enc.decode([int(model(torch.tensor([enc.encode_ordinary("The cat")]))[0, -1].argmax())])
        pairs = [(d["text"], " " + d["target"]) for d in LASTWORD] + [("A", " quick brown fox"),
                                                                      ("The cat", favourite)]
        got = lm.loglikelihood(requests(*pairs), disable_tqdm=True)
        for (context, continuation), (logprob, greedy) in zip(pairs, got):
            want, want_greedy = own_loglikelihood(model, context, continuation, window)
            assert logprob == pytest.approx(want, abs=1e-4) and greedy == want_greedy, (name, context[-20:])
        assert got[-1][1] and not got[0][1]
        # The batch size changes nothing.
        again = GptxLM(load=str(runs[name]), batch_size=1, max_length=window).loglikelihood(requests(*pairs), True)
        assert [g for _, g in again] == [g for _, g in got]
        assert [x for x, _ in again] == pytest.approx([x for x, _ in got], abs=1e-5)


def test_rolling_loglikelihood_is_gptxs_own_evaluation_of_the_text(setup):
    """With a text of exactly two windows, lm-eval's rolling windows are gptx's evaluator's
    consecutive windows over end-of-text + the text (the hf comparison covers partial ones)."""
    import numpy as np

    from gptx.interop.lm_eval_adapter import GptxLM
    from gptx.training.consolidate import load_plain_model
    _, runs = setup
    enc = gpt2_encoding()
    ids = enc.encode_ordinary(LONG_TEXT + " " + LONG_TEXT)[:64]
    text = enc.decode(ids)
    assert enc.encode_ordinary(text) == ids  # 64 tokens: two windows of 32 predictions
    (rolling,) = GptxLM(load=str(runs["plain"])).loglikelihood_rolling(requests((text,)), disable_tqdm=True)
    model, _ = load_plain_model(runs["plain"])
    own = evaluate_tokens(model, np.asarray([GPT2_EOT] + ids), 32)
    assert own["tokens"] == 64 and -rolling == pytest.approx(own["loss_sum_nats"], rel=1e-5)


def test_lm_eval_gives_the_hf_models_numbers_on_the_export(setup):
    pytest.importorskip("transformers")
    import importlib

    from lm_eval.tasks import TaskManager
    importlib.import_module("gptx.interop.lm_eval_adapter")  # registers the gptx model
    tmp, runs = setup
    tasks = ["gptx_lastword", "gptx_choice", "gptx_rolling"]

    def evaluate(model, model_args):
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, device="cpu",
                                      task_manager=TaskManager(include_path=str(tmp / "tasks"), include_defaults=False),
                                      batch_size=2)
        return {t: {k: v for k, v in out["results"][t].items() if "," in k and "stderr" not in k} for t in tasks}
    ours = evaluate("gptx", f"load={runs['plain']}")
    hf = evaluate("hf", f"pretrained={tmp / 'hf'},dtype=float32")
    assert ours.keys() == hf.keys() and all(ours[t] for t in tasks)
    for task in tasks:
        assert ours[task].keys() == hf[task].keys()
        for metric, value in ours[task].items():
            assert value == pytest.approx(hf[task][metric], rel=1e-4), (task, metric)
    assert math.isfinite(ours["gptx_rolling"]["bits_per_byte,none"]) and ours["gptx_rolling"]["bits_per_byte,none"] > 0


def test_a_variant_evaluates_through_the_command_line_beyond_its_training_context(setup, tmp_path, monkeypatch,
                                                                                  capfd, local_tasks_only):
    from gptx.cli.lm_eval import run_lm_eval
    tmp, runs = setup
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # lm-eval's command line reads sys.argv
    code = run_lm_eval(["--model", "gptx", "--model_args", f"load={runs['alibi']},max_length=64", "--batch_size", "4",
                        "--device", "cpu", "--tasks", "gptx_lastword,gptx_choice,gptx_rolling,gptx_generate",
                        "--include_path", str(tmp / "tasks"), "--output_path", str(out)])
    err = capfd.readouterr().err
    assert code == 0, err[-3000:]
    (report,) = out.rglob("results_*.json")
    results = json.loads(report.read_text())["results"]
    assert set(results) == {"gptx_lastword", "gptx_choice", "gptx_rolling", "gptx_generate"}
    assert 0 <= results["gptx_choice"]["acc,none"] <= 1 and results["gptx_rolling"]["word_perplexity,none"] > 1
    assert "gptx generate_until" in err  # the progress bars


def test_bad_model_args_are_one_line(setup, capsys, local_tasks_only):
    from gptx.cli.lm_eval import run_lm_eval
    _, runs = setup
    assert run_lm_eval(["--model", "gptx", "--model_args", f"load={runs['plain']},max_length=64", "--device", "cpu",
                        "--tasks", "gptx_lastword", "--include_path", str(setup[0] / "tasks")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --model_args max_length=64: this model's learned positions end at 32; only alibi, rotary or none "
        "positions take longer contexts")
    with pytest.raises(ConfigError, match="load=RUN_DIR"):
        from gptx.interop.lm_eval_adapter import GptxLM
        GptxLM()
    # A task of one's own without its --include_path: lm-eval's ValueError traceback before.
    assert run_lm_eval(["--model", "gptx", "--model_args", f"load={runs['plain']}", "--device", "cpu",
                        "--tasks", "gptx_lastword"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: --tasks: Tasks not found: gptx_lastword; a task of your own needs --include_path DIR")


def test_generation_stops_at_stop_strings_and_ignores_empty_ones(setup):
    from gptx.interop.lm_eval_adapter import GptxLM
    from gptx.model.generate import generate
    from gptx.training.consolidate import load_plain_model
    _, runs = setup
    lm = GptxLM(load=str(runs["plain"]), batch_size="auto:4")
    enc = gpt2_encoding()
    model, _ = load_plain_model(runs["plain"])
    prompt = enc.encode_ordinary("Once upon a time")
    free = enc.decode(generate(model, prompt, 12, greedy=True)[len(prompt):])  # greedy, no stop strings
    assert len(free) > 4
    stop = free[2:4]  # a stop string that occurs in what the model writes
    (text,) = lm.generate_until([SimpleNamespace(args=("Once upon a time", {"until": ["", stop], "max_gen_toks": 12}))],
                                disable_tqdm=True)
    assert text == free.split(stop)[0]


def test_a_table_padded_by_hand_generates_and_scores_only_real_tokens(tmp_path):
    from gptx.interop.lm_eval_adapter import GptxLM
    model = GPT(ModelConfig(**{**SHAPE, "vocab_size": 50304}), seed=3)  # nanoGPT's padding, trained on GPT-2 data
    with torch.no_grad():  # row 50300, no token, outscores every real one at every position
        model.layers[str(2 + SHAPE["n_layer"])].ln_f.bias.fill_(10.0)
        model.layers["0"].wte.weight[50300] = 1.0
    save_weights_only({int(i): layer.state_dict() for i, layer in model.layers.items()}, Config(model=model.cfg),
                      tmp_path / "run", source="test")
    lm = GptxLM(load=str(tmp_path / "run"))
    (text,) = lm.generate_until(requests(("Once upon a time", {"until": ["\n"], "max_gen_toks": 4})),
                                disable_tqdm=True)
    with torch.no_grad():
        logits = model(torch.tensor([gpt2_encoding().encode_ordinary("Once upon a time")]))[0, -1]
    best_real = int(logits[:50257].argmax())
    assert text.startswith(gpt2_encoding().decode([best_real]))
    ((_, greedy),) = lm.loglikelihood(requests(("Once upon a time", gpt2_encoding().decode([best_real]))),
                                      disable_tqdm=True)
    assert greedy  # the best real token is greedy decoding's pick, whatever the padding rows hold


def test_model_args_and_generation_settings_are_checked_and_a_blank_context_scores(setup):
    from gptx.interop.lm_eval_adapter import GptxLM
    _, runs = setup
    with pytest.raises(ConfigError, match="--model_args max_lenght: not an argument of the gptx model"):
        GptxLM(load=str(runs["plain"]), max_lenght="64")
    lm = GptxLM(load=str(runs["plain"]), max_batch_size=8)  # lm-eval's own extra is taken
    sampled = {"until": ["\n"], "max_gen_toks": 3, "do_sample": True, "temperature": 0.7}
    (text,) = lm.generate_until(requests(("Once", {**sampled, "top_k": 0})), disable_tqdm=True)  # 0: off
    with pytest.raises(ConfigError, match=r"gen_kwargs top_p=0.0: must be in \(0, 1\]"):
        lm.generate_until(requests(("Once", {**sampled, "top_p": 0})), disable_tqdm=True)
    # Greedy generation reads no sampling setting, as Hugging Face's does not.
    greedy = {**sampled, "do_sample": False, "top_p": 0}
    assert lm.generate_until(requests(("Once", greedy)), disable_tqdm=True) == \
        lm.generate_until(requests(("Once", {**greedy, "top_p": 1.0, "temperature": 5.0})), disable_tqdm=True)
    # A task's budget under any of its names, and sampling from a temperature without do_sample, as
    # lm-eval's own models read them: before, max_new_tokens was ignored (256 tokens) and so was a temperature.
    lengths = [len(gpt2_encoding().encode_ordinary(text)) for text in
               lm.generate_until(requests(*[("Once", {"until": ["zzz"], key: 3}) for key in
                                            ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")]),
                                 disable_tqdm=True)]
    assert all(n <= 3 for n in lengths), lengths
    hot = {"until": ["zzz"], "max_new_tokens": 8, "temperature": 50.0}
    assert lm.generate_until(requests(("Once", hot)), disable_tqdm=True) != \
        lm.generate_until(requests(("Once", {**hot, "do_sample": False})), disable_tqdm=True)
    with pytest.raises(ConfigError, match="gen_kwargs max_new_tokens 64: must be from 1 to 31, below the model.s "
                                          "32-token window"):
        lm.generate_until(requests(("Once", {"until": [], "max_new_tokens": 64})), disable_tqdm=True)
    # " " encodes to no context tokens once lm-eval moves its space into the continuation
    ((blank, _),) = lm.loglikelihood(requests((" ", "hello world")), disable_tqdm=True)
    ((empty, _),) = lm.loglikelihood(requests(("", " hello world")), disable_tqdm=True)
    assert blank == empty and math.isfinite(blank)
