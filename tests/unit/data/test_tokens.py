import json

import numpy as np
import pytest

from gptx.data.default_corpus import default_data_dir
from gptx.data.tokens import GPT2_EOT, TokenWindows, check_data, gpt2_encoding, gpt2_ranks, open_tokens
from gptx.errors import DataError
from tests.helpers.runs import make_token_dir


@pytest.fixture(scope="module")
def enc():
    return gpt2_encoding()


def test_gpt2_bpe_works_offline_and_matches_known_ids(enc):
    # "Hello world" is [15496, 995] in GPT-2's published BPE.
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == GPT2_EOT


def test_a_wrong_bpe_file_is_refused(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"SGVsbG8= 0\n")
    with pytest.raises(DataError, match="is not that of tiktoken's r50k_base"):
        gpt2_ranks(str(bad))


def test_caches_that_cannot_be_written_or_read_do_not_stop_a_given_bpe_file(enc, tmp_path, monkeypatch):
    bpe = tmp_path / "gpt2.tiktoken"
    bpe.write_bytes(gpt2_ranks())
    (tmp_path / "a_file").write_text("where the cache folders would go\n")
    monkeypatch.setenv("GPTX_CACHE", str(tmp_path / "a_file" / "gptx"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "a_file" / "tiktoken"))
    lines = []
    assert gpt2_ranks(str(bpe), log=lines.append) == bpe.read_bytes()
    assert len(lines) == 2 and all("could not cache the GPT-2 BPE" in line for line in lines), lines


def test_default_corpus_is_gpt2_tokens_of_the_python_docs(enc):
    d = default_data_dir()
    train = open_tokens(d, "train")
    check_data(d, vocab_size=50257, seq_len=1024)
    assert len(train) > 50_000
    assert "the" in enc.decode(train[:2000].tolist())
    # val.bin starts at a topic's first token: no topic is half trained on, half validated on.
    from gptx.data.default_corpus import default_corpus_texts
    val_start = enc.decode(open_tokens(d, "val")[:50].tolist())
    assert train[-1] == enc.eot_token and any(text.startswith(val_start[:100]) for text in default_corpus_texts())


def _global_samples(windows_per_rank, iters, accum):
    seen = []
    for _ in range(iters):
        for _ in range(accum):
            for w in windows_per_rank:
                x, y = next(w)
                seen.extend(map(tuple, x.tolist()))
    return seen


def test_windows_are_the_same_global_batches_whatever_the_dp_size(tmp_path):
    tokens = np.arange(1000) % 97
    one = [TokenWindows(tokens, 9, 2, 0, 1, seed=4)]
    two = [TokenWindows(tokens, 9, 2, r, 2, seed=4) for r in range(2)]
    a = _global_samples(one, iters=3, accum=4)
    b = _global_samples(two, iters=3, accum=2)
    for i in range(3):  # per iteration (8 samples) the sets agree
        assert sorted(a[8 * i:8 * i + 8]) == sorted(b[8 * i:8 * i + 8])


def test_epochs_visit_every_window_once_and_labels_shift_by_one():
    tokens = np.arange(101)
    w = TokenWindows(tokens, seq_len=10, micro_batch=1, seed=1)
    starts = []
    for _ in range(30):
        x, y = next(w)
        assert y[0, :-1].tolist() == x[0, 1:].tolist() and y[0, -1] == x[0, -1] + 1
        starts.append(int(x[0, 0]))
    assert sorted(starts[:10]) == sorted(starts[10:20]) == list(range(0, 100, 10))
    assert starts[:10] != starts[10:20]  # each epoch has its own order


def test_resuming_windows_continues_the_same_sequence():
    tokens = np.arange(500)
    full = TokenWindows(tokens, 7, 2, 1, 2, seed=9)
    batches = [next(full)[0] for _ in range(10)]
    resumed = TokenWindows(tokens, 7, 2, 1, 2, seed=9, start_sample=6 * 2 * 2)
    for expected in batches[6:]:
        assert next(resumed)[0].equal(expected)


@pytest.mark.parametrize("problem,needle", [
    ("missing", "missing val.bin"), ("short", "fewer than one window"), ("range", "token id 300 is outside"),
    ("nodir", "not a directory"),
])
def test_bad_data_is_reported(tmp_path, problem, needle):
    d = make_token_dir(tmp_path / "d", vocab_size=256)
    if problem == "missing":
        (d / "val.bin").unlink()
    elif problem == "short":
        np.arange(10, dtype=np.uint16).tofile(d / "val.bin")
    elif problem == "range":
        np.full(100, 300, dtype=np.uint16).tofile(d / "train.bin")
    elif problem == "nodir":
        d = tmp_path / "nowhere"
    with pytest.raises(DataError, match=needle):
        check_data(d, vocab_size=256, seq_len=32)


@pytest.mark.parametrize("meta,model_vocab,needle", [
    # Another tokenizer's data for a GPT-2-vocabulary model: ids would mean other tokens.
    ({"tokenizer": "sentencepiece-32k", "vocab_size": 32000}, 50257,
     "tokenized with a 32000-token vocabulary (sentencepiece-32k), but model.vocab_size is 50257"),
    # A table wider than the tokenizer: gptx pads with pad_vocab_to_multiple instead.
    ({"tokenizer": "gpt2", "vocab_size": 50257}, 50304, "pad_vocab_to_multiple"),
])
def test_data_from_another_tokenizer_is_refused(tmp_path, meta, model_vocab, needle):
    d = make_token_dir(tmp_path / "d", vocab_size=256)
    (d / "meta.json").write_text(json.dumps({**meta, "dtype": "uint16"}))
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        check_data(d, vocab_size=model_vocab, seq_len=32)


def test_a_nanogpt_character_level_directory_is_read_by_its_meta_pkl(tmp_path):
    import pickle
    d = make_token_dir(tmp_path / "d", vocab_size=95)
    (d / "meta.json").unlink()
    chars = [chr(32 + i) for i in range(95)]
    with open(d / "meta.pkl", "wb") as f:  # what nanoGPT's shakespeare_char/prepare.py writes
        pickle.dump({"vocab_size": 95, "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}, f)
    with pytest.raises(DataError, match=r"95-token vocabulary \(nanoGPT meta.pkl\), but model.vocab_size is 50257"):
        check_data(d, vocab_size=50257, seq_len=32)
    check_data(d, vocab_size=95, seq_len=32)


def test_a_meta_pkl_runs_no_code(tmp_path):
    import pickle
    d = make_token_dir(tmp_path / "d", vocab_size=95)
    (d / "meta.json").unlink()

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))
    (d / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 95, "x": Payload()}))
    with pytest.raises(DataError, match="not a nanoGPT meta.pkl"):
        check_data(d, vocab_size=95, seq_len=32)
    assert not (tmp_path / "pwned").exists()


def test_a_resumed_model_padded_by_hand_keeps_training_on_its_data(tmp_path):
    d = make_token_dir(tmp_path / "d", vocab_size=256)
    with pytest.raises(DataError, match="set model.vocab_size 256"):
        check_data(d, vocab_size=320, seq_len=32)  # a new run: pad with pad_vocab_to_multiple instead
    check_data(d, vocab_size=320, seq_len=32, allow_smaller_vocabulary=True)  # an existing model (resume)
    with pytest.raises(DataError, match="tokenized with a 256-token vocabulary"):
        check_data(d, vocab_size=200, seq_len=32, allow_smaller_vocabulary=True)  # larger data never fits


# ---- token files checked against their meta.json (issue 26 item 3)

def prepared_dir(path, n_train=5000, n_val=600, dtype="uint16"):
    """A directory as tools/prepare_data.py writes it: meta.json records each split's token count."""
    make_token_dir(path, n_train=n_train, n_val=n_val, dtype=dtype)
    (path / "meta.json").write_text(json.dumps({"format": "gptx-tokens-v1", "vocab_size": 256, "dtype": dtype,
                                                "train_tokens": n_train, "val_tokens": n_val}))
    return path


def test_a_split_cut_short_or_replaced_is_refused_naming_the_file_and_both_counts(tmp_path):
    d = prepared_dir(tmp_path / "d")
    check_data(d, vocab_size=256, seq_len=32)
    train = d / "train.bin"
    train.write_bytes(train.read_bytes()[:2 * 1000])  # a copy that ran out of space
    with pytest.raises(DataError) as e:
        check_data(d, vocab_size=256, seq_len=32)
    assert str(e.value) == (f"data file '{train}' holds 1,000 tokens where meta.json says 5,000: the file was cut "
                            f"short or replaced; prepare the data again")
    (d / "val.bin").write_bytes((d / "val.bin").read_bytes() + b"\0\0" * 300)
    with pytest.raises(DataError, match=r"val.bin' holds 900 tokens where meta.json says 600: the file was "
                                        r"replaced or appended to"):
        open_tokens(d, "val")


def test_a_split_of_the_wrong_width_or_of_a_partial_token_is_refused(tmp_path):
    d = prepared_dir(tmp_path / "d")
    np.zeros(5000, dtype=np.uint32).tofile(d / "train.bin")  # written as uint32, meta.json says uint16
    with pytest.raises(DataError, match="holds 10,000 tokens where meta.json says 5,000: it holds uint32 tokens "
                                        "where meta.json says uint16"):
        open_tokens(d, "train")
    (d / "train.bin").write_bytes(b"\0" * 10_001)
    with pytest.raises(DataError, match=r"10,001 bytes is not a whole number of uint16 tokens \(2 bytes each"):
        open_tokens(d, "train")


def test_a_meta_json_that_is_not_json_or_holds_a_bad_count_is_one_line(tmp_path):
    d = prepared_dir(tmp_path / "d")
    (d / "meta.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(DataError, match=r"meta.json': not valid JSON$"):
        check_data(d, vocab_size=256, seq_len=32)
    (d / "meta.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object"):
        check_data(d, vocab_size=256, seq_len=32)
    (d / "meta.json").write_text(json.dumps({"vocab_size": 256, "dtype": "uint16", "train_tokens": "many"}))
    with pytest.raises(DataError, match="'train_tokens' must be a whole number, got 'many'"):
        check_data(d, vocab_size=256, seq_len=32)


def test_a_garbage_meta_pkl_is_one_line(tmp_path):
    d = make_token_dir(tmp_path / "d", vocab_size=95)
    (d / "meta.json").unlink()
    (d / "meta.pkl").write_bytes(b"\x80\x04garbage, or a pickle cut short")
    with pytest.raises(DataError, match="not a nanoGPT meta.pkl"):
        check_data(d, vocab_size=95, seq_len=32)


def test_evaluate_checks_a_split_file_against_meta_json(tmp_path):
    from gptx.interop.evaluate import load_eval_tokens
    d = prepared_dir(tmp_path / "d")
    (d / "val.bin").write_bytes((d / "val.bin").read_bytes()[:200])
    with pytest.raises(DataError, match="holds 100 tokens where meta.json says 600"):
        load_eval_tokens(d / "val.bin", 256)


def test_uint16_tokens_cannot_stand_for_a_vocabulary_over_65536(tmp_path):
    # uint32 ids (a 128,256-token tokenizer) read as uint16 are halves of ids: every range check passes.
    d = make_token_dir(tmp_path / "d", vocab_size=256, dtype="uint32")
    (d / "meta.json").write_text(json.dumps({"vocab_size": 128256, "dtype": "uint16"}))
    with pytest.raises(DataError, match="'dtype' uint16 cannot hold the ids of a 128256-token vocabulary"):
        check_data(d, vocab_size=128256, seq_len=32)
    (d / "meta.json").unlink()  # nanoGPT's layout: read as uint16 GPT-2 tokens
    with pytest.raises(DataError, match="read as uint16 tokens of a 50257-token vocabulary.*'dtype': 'uint32'"):
        check_data(d, vocab_size=128256, seq_len=32, allow_smaller_vocabulary=True)
    (d / "meta.json").write_text(json.dumps({"vocab_size": 128256, "dtype": "uint32"}))
    check_data(d, vocab_size=128256, seq_len=32)


def test_uint32_gpt2_tokens_without_a_meta_json_are_not_read_as_uint16(tmp_path):
    ids = np.random.default_rng(0).integers(0, 50257, 3000)
    d = tmp_path / "d"
    d.mkdir()
    for split in ("train", "val"):  # before: read as id, 0, id, 0, ..., every check passed
        ids.astype(np.uint32).tofile(d / f"{split}.bin")
    with pytest.raises(DataError, match=r"train.bin': read as uint16 tokens, every second one is 0: it holds "
                                        r"uint32 tokens; say so in a meta.json"):
        check_data(d, vocab_size=50257, seq_len=32)
    (d / "meta.json").write_text(json.dumps({"vocab_size": 50257, "dtype": "uint32"}))
    check_data(d, vocab_size=50257, seq_len=32)
    (d / "meta.json").unlink()  # nanoGPT's own layout, uint16, whatever ids it holds
    for split in ("train", "val"):
        ids.astype(np.uint16).tofile(d / f"{split}.bin")
    check_data(d, vocab_size=50257, seq_len=32)


@pytest.mark.parametrize("change,needle", [
    (lambda d: (d / "meta.json").write_text('{"vocab_size": true, "dtype": "uint16"}'),
     "'vocab_size' must be a positive integer, got True"),
    (lambda d: ((d / "train.bin").unlink(), (d / "train.bin").mkdir()), "train.bin': not a file"),
])
def test_a_meta_json_vocabulary_of_true_or_a_split_that_is_a_directory_is_one_line(tmp_path, change, needle):
    d = make_token_dir(tmp_path / "d", vocab_size=256)
    change(d)
    with pytest.raises(DataError, match=needle):
        check_data(d, vocab_size=256, seq_len=32)


def test_a_meta_pkl_over_65536_tokens_is_refused(tmp_path):
    import pickle
    d = make_token_dir(tmp_path / "d", vocab_size=256)
    (d / "meta.json").unlink()
    (d / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 100_000}))
    with pytest.raises(DataError, match="cannot be nanoGPT's uint16 tokens"):
        check_data(d, vocab_size=100_000, seq_len=32)


def test_an_epochs_order_is_numpys_permutation_held_in_four_byte_indices():
    import tracemalloc

    # The order every run so far trained in (and its checkpoints resume in): permutation(n) of (seed, epoch).
    n = 2_000_000
    windows = TokenWindows(np.zeros(n * 4 + 1, dtype=np.uint16), 4, micro_batch=1, seed=5)
    tracemalloc.start()
    try:
        first = windows.locate(0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * n  # 8-byte indices would be 8 * n, and permutation() held two arrays of them
    expected = np.random.default_rng([5, 0]).permutation(n)
    assert first == (0, expected[0])
    assert [windows.locate(i)[1] for i in range(0, n, 997)] == expected[::997].tolist()
    assert windows.locate(n + 3) == (0, np.random.default_rng([5, 1]).permutation(n)[3])
