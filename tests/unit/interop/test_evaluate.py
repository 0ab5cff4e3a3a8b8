"""What tools/evaluate.py reads: text, JSON lines and token files, checked against the model."""
import json

import numpy as np
import pytest

from gptx.data.tokens import GPT2_EOT, gpt2_encoding
from gptx.errors import DataError
from gptx.interop.evaluate import load_eval_tokens
from tests.helpers.runs import make_token_dir


def test_jsonl_documents_are_tokenized_as_training_data_is(tmp_path):
    docs = ["First document, naïve.", "Second one\nwith two lines."]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)) + "\n")
    tokens, n_bytes = load_eval_tokens(path, 50257)
    enc = gpt2_encoding()
    assert tokens.tolist() == enc.encode_ordinary(docs[0]) + [GPT2_EOT] + enc.encode_ordinary(docs[1]) + [GPT2_EOT]
    assert n_bytes == len(docs[0].encode()) + len(docs[1].encode())


def test_a_token_file_measures_the_bytes_of_its_documents_as_their_jsonl_does(tmp_path):
    docs = ["First document, naïve.", "Second one\nwith two lines."]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}))
    from_text, text_bytes = load_eval_tokens(tmp_path / "eval.jsonl", 50257)
    from_text.astype(np.uint16).tofile(tmp_path / "test.bin")  # a split named neither train nor val
    tokens, n_bytes = load_eval_tokens(tmp_path / "test.bin", 50257)
    assert tokens.tolist() == from_text.tolist() and n_bytes == text_bytes  # end-of-text is no text
    for size in (0, 3):  # empty; cut inside a token
        (tmp_path / "cut.bin").write_bytes(bytes(size))
        with pytest.raises(DataError, match=f"'{tmp_path / 'cut.bin'}': {size} bytes is not a whole number of "
                                            f"uint16 tokens"):
            load_eval_tokens(tmp_path / "cut.bin", 50257)


def test_jsonl_without_text_fields_names_the_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(DataError, match="line 2: expected an object with a string 'text' field"):
        load_eval_tokens(path, 50257)


def test_token_files_of_a_larger_vocabulary_are_refused(tmp_path):
    # Evaluation takes the model as it is: a table padded by hand beyond its data's vocabulary
    # still evaluates (training refuses it for a new run); a larger data vocabulary never fits.
    d = make_token_dir(tmp_path / "d", vocab_size=256)
    (d / "meta.json").write_text(json.dumps({"vocab_size": 60000, "tokenizer": "sp", "dtype": "uint16"}))
    for target in (d, d / "val.bin"):
        with pytest.raises(DataError, match=r"60000-token vocabulary \(sp\), but model.vocab_size is 50257"):
            load_eval_tokens(target, 50257)
    (d / "meta.json").write_text(json.dumps({"vocab_size": 256, "dtype": "uint16"}))
    assert len(load_eval_tokens(d, 50304)[0]) == 4000


def test_text_needs_a_gpt2_vocabulary_model(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="text is tokenized with GPT-2 BPE"):
        load_eval_tokens(tmp_path / "a.txt", 256)
    assert len(load_eval_tokens(tmp_path / "a.txt", 50304)[0]) == 1  # a table padded by hand still reads text
    (tmp_path / "a.csv").write_text("hello")
    with pytest.raises(DataError, match="expected a .txt, .jsonl or .bin file"):
        load_eval_tokens(tmp_path / "a.csv", 50257)
    assert np.array_equal(load_eval_tokens(tmp_path / "a.txt", 50257)[0], gpt2_encoding().encode_ordinary("hello"))
