"""Weighted mixtures of data directories: the file, the blend's proportions, and training on one."""
import json
import math

import numpy as np
import pytest

from gptx.cli.pretrain import run_pretrain
from gptx.data.blend import Blend, quotas
from gptx.data.mixture import check_sources, read_mixture
from gptx.data.tokens import TokenWindows, open_tokens
from gptx.errors import DataError
from tests.helpers.runs import make_token_dir, read_metrics, train_losses, write_ds_config, write_model_yaml


def mixture_file(tmp, *entries) -> str:
    path = tmp / "mix.yaml"
    path.write_text(json.dumps({"sources": list(entries)}))  # JSON is YAML
    return path


def test_weights_are_normalised_and_paths_relative_to_the_file(tmp_path):
    make_token_dir(tmp_path / "a")
    make_token_dir(tmp_path / "b")
    sources = read_mixture(mixture_file(tmp_path, {"path": "a", "weight": 1.0}, {"path": str(tmp_path / "b"),
                                                                                "weight": "0.5"}))
    assert [s.path for s in sources] == [tmp_path / "a", tmp_path / "b"]
    assert [s.weight for s in sources] == pytest.approx([2 / 3, 1 / 3])


@pytest.mark.parametrize("entries,needle", [
    ([{"path": "a"}, {"path": "missing", "weight": 1}], "source 2: '.*missing' is not a directory"),
    ([{"path": "a", "weight": 0}], r"source 1 \(a\): weight must be a positive number, got 0"),
    ([{"path": "a", "weight": "lots"}], "weight must be a positive number, got 'lots'"),
    ([{"path": "a", "weight": -1}], "weight must be a positive number, got -1"),
    ([{"path": "a", "share": 1}], r"source 1 must be \{path: DIR, weight: NUMBER\}"),
    ([], "expected 'sources:'"),
    ([{"path": "a", "weight": 1}, {"path": "b", "weight": 1e-6}],
     "1e-06 of the total weight, which rounds to no sample in every 10,000: it would never be sampled"),
    # Above 1/20,000, yet the largest remainders give its sample to the other small source.
    ([{"path": "a", "weight": 0.99988}, {"path": "b", "weight": 6e-5}, {"path": "c", "weight": 6e-5}],
     "source '.*c' has 6e-05 of the total weight, which rounds to no sample in every 10,000"),
])
def test_bad_mixture_files_are_one_line(tmp_path, entries, needle):
    for name in "abc":
        make_token_dir(tmp_path / name)
    with pytest.raises(DataError, match=needle):
        read_mixture(mixture_file(tmp_path, *entries))


def test_sources_from_different_tokenizers_are_refused(tmp_path):
    make_token_dir(tmp_path / "a", vocab_size=256)
    make_token_dir(tmp_path / "b", vocab_size=200)
    sources = read_mixture(mixture_file(tmp_path, {"path": "a"}, {"path": "b"}))
    with pytest.raises(DataError, match="different tokenizers: .* has 256 tokens, .* has 200 tokens"):
        check_sources(sources, vocab_size=256, seq_len=32)
    with pytest.raises(DataError, match="200-token vocabulary"):  # each is also checked against the model
        check_sources(sources[1:], vocab_size=256, seq_len=32)


def test_quotas_add_up_by_largest_remainders():
    assert quotas([2 / 3, 1 / 3], 10) == [7, 3]
    assert quotas([0.25, 0.25, 0.5], 10_000) == [2500, 2500, 5000]
    assert sum(quotas([0.1] * 7 + [0.3], 997)) == 997


@pytest.mark.parametrize("weights", [[3, 1], [1.0, 1.0], [1e308, 1e308 / 3]])
def test_weights_that_do_not_sum_to_one_give_the_same_shares(weights):
    # Before: quotas summed to more than a block ([30000, 10000] for [3, 1]), so every block
    # skipped samples of each source; 1e308-sized weights overflowed to inf shares of 0.
    assert sum(quotas(weights)) == 10_000
    assert quotas(weights) == quotas([w / sum(w / 1e300 for w in weights) / 1e300 for w in weights])
    windows = TokenWindows([np.arange(33), np.arange(100, 133)], 4, 1, weights=weights)  # 8 windows each
    per_source = [0, 0]
    for g in range(20_000):
        source, index = windows.blend.locate(g)
        assert index == per_source[source]  # each source's samples in order, none skipped
        per_source[source] += 1


def test_a_mixture_files_quotas_are_the_ones_earlier_checkpoints_were_trained_with():
    # A tie broken another way would move every later sample to another source's position on resume.
    assert quotas([w / 12 for w in (1, 10, 1)]) == [833, 8334, 833]


def test_huge_weights_in_a_mixture_file_are_read_as_their_ratio(tmp_path):
    make_token_dir(tmp_path / "a")
    make_token_dir(tmp_path / "b")
    sources = read_mixture(mixture_file(tmp_path, {"path": "a", "weight": 3e307}, {"path": "b", "weight": 1e308}))
    assert [s.weight for s in sources] == pytest.approx([0.3 / 1.3, 1 / 1.3])


def test_the_blend_deals_each_source_its_share_and_its_samples_in_order():
    weights = [0.6, 0.3, 0.1]
    blend = Blend(weights, seed=5)
    n = 123_457  # not a whole number of blocks
    located = [blend.locate(g) for g in range(n)]
    sources = np.array([s for s, _ in located])
    for s, w in enumerate(weights):
        share = np.count_nonzero(sources == s) / n
        assert abs(share - w) < 3 * math.sqrt(w * (1 - w) / n), (s, share)  # within sampling error
        # the source's own samples come 0, 1, 2, ...: no gap, no repeat
        assert [i for src, i in located if src == s] == list(range(np.count_nonzero(sources == s)))
    # a fresh blend answers for any sample alone (a resume, another rank)
    assert [Blend(weights, seed=5).locate(g) for g in (0, 77_777, n - 1)] == [located[0], located[77_777],
                                                                                located[n - 1]]
    assert Blend(weights, seed=6).locate(77_777) != located[77_777] or Blend(weights, seed=6).locate(5) != located[5]


def test_mixture_batches_are_the_same_for_any_data_parallel_size_and_after_a_resume():
    a, b = np.arange(1000) % 97, 500 + np.arange(3000) % 89
    def windows(rank, size, start=0):
        return TokenWindows([a, b], 9, 2, rank, size, seed=4, start_sample=start, weights=[0.7, 0.3])
    w1 = windows(0, 1)
    seq1 = [tuple(r) for _ in range(6) for r in next(w1)[0].tolist()]
    w2 = [windows(0, 2), windows(1, 2)]
    seq2 = [tuple(r) for _ in range(3) for w in w2 for r in next(w)[0].tolist()]
    assert seq1 == seq2
    resumed = windows(0, 1, start=6)
    assert [tuple(r) for _ in range(3) for r in next(resumed)[0].tolist()] == seq1[6:12]


def test_a_run_on_a_two_source_mixture_logs_shares_epochs_and_val_per_source_and_resumes_exactly(
        dist_world1, tmp_path, capsys):
    make_token_dir(tmp_path / "big", n_train=20000, seed=1)
    make_token_dir(tmp_path / "small", n_train=3000, seed=2)
    mix = mixture_file(tmp_path, {"path": "big", "weight": 3}, {"path": "small", "weight": 1})
    model = write_model_yaml(tmp_path / "model.yaml")
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=2)

    def args(save, iters, *extra):
        return ["--model", str(model), "--data", str(mix), "--deepspeed_config", str(ds), "--save", str(save),
                "--pipe-parallel-size", "1", "--train-iters", str(iters), "--eval-interval", "3", "--eval-iters", "1",
                "--log-interval", "1", "--lr", "3e-3", "--warmup-iters", "1", *extra]
    assert run_pretrain(args(tmp_path / "full", 6)) == 0
    out = capsys.readouterr().out
    windows = {name: (len(open_tokens(tmp_path / name, "train")) - 1) // 32 for name in ("big", "small")}
    samples = 6 * 4
    for name, share in (("big", 0.75), ("small", 0.25)):
        assert (f"{tmp_path / name}: {windows[name]:,} windows, share {share:.3f}, "
                f"{samples * share / windows[name]:.2f} epochs over the run") in out
    (data,) = [r["data"] for r in read_metrics(tmp_path / "full") if "data" in r]
    assert [(s["weight"], s["windows"]) for s in data["sources"]] == [(0.75, windows["big"]), (0.25, windows["small"])]
    vals = [r for r in read_metrics(tmp_path / "full") if "val_loss" in r]
    assert len(vals) == 2 and set(vals[0]["val_loss_per_source"]) == {str(tmp_path / "big"), str(tmp_path / "small")}
    per = list(vals[0]["val_loss_per_source"].values())
    assert vals[0]["val_loss"] == pytest.approx(0.75 * per[0] + 0.25 * per[1])
    # Stopped at iteration 4 and resumed: the same losses as the run that went straight through.
    assert run_pretrain(args(tmp_path / "part", 6, "--exit-interval", "4")) == 0
    assert run_pretrain(args(tmp_path / "part", 6, "--load", str(tmp_path / "part"))) == 0
    assert train_losses(tmp_path / "part") == train_losses(tmp_path / "full")
    # Resuming after the mixture file was edited says so.
    mixture_file(tmp_path, {"path": "big", "weight": 1}, {"path": "small", "weight": 1})
    capsys.readouterr()
    assert run_pretrain(args(tmp_path / "part", 8, "--load", str(tmp_path / "part"), "--lr-decay-iters", "6")) == 0
    assert (f"changed since the checkpoint: data {mix.resolve()} (big 0.750, small 0.250) -> {mix} (big 0.500, "
            f"small 0.500)") in capsys.readouterr().out


def test_one_source_says_its_epochs_and_warns_of_repeats_in_training_and_in_evaluation(dist_world1, tmp_path, capsys):
    data = make_token_dir(tmp_path / "one", n_train=200, n_val=100)  # 6 train and 3 val windows of 32
    model = write_model_yaml(tmp_path / "model.yaml")
    ds = write_ds_config(tmp_path / "ds.json", micro=2, accum=2)
    assert run_pretrain(["--model", str(model), "--data", str(data), "--deepspeed_config", str(ds), "--save",
                         str(tmp_path / "run"), "--pipe-parallel-size", "1", "--train-iters", "8", "--eval-interval",
                         "8", "--eval-iters", "1"]) == 0
    out = capsys.readouterr().out
    # Before, only a mixture's sources were warned of: one source's run repeated its data silently.
    assert "data: 6 windows of 32 predictions per epoch, reshuffled each epoch, 5.33 epochs over the run (warning: " \
           "repeats 5.3 times)" in out
    assert (f"warning: {data}: an evaluation reads 4 samples of val.bin's 3 windows, so some count more than "
            f"once") in out
