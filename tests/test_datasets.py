"""Datasets: format detection, validation with the bad line's number, assistant-only labels, token counts."""

from __future__ import annotations

import json
import re

import pytest

from engine.datasets import (
    IGNORE,
    DatasetError,
    assistant_spans,
    chat_template,
    encode,
    read_dataset,
    token_stats_in_subprocess,
    validation_count,
)
from tests.tinydata import records, write_dataset, write_jsonl
from tests.tinymodel import make_tokenizer


@pytest.mark.parametrize("fmt, name", [("openai", "OpenAI chat"), ("sharegpt", "ShareGPT"), ("alpaca", "Alpaca"),
                                       ("text", "plain text")])
def test_each_format_is_detected_and_normalized(tmp_path, fmt, name):
    dataset = read_dataset(write_dataset(tmp_path, fmt, rows=5))
    assert (dataset.format, dataset.format_name, len(dataset.examples)) == (fmt, name, 5)
    first = dataset.examples[0]
    if fmt == "text":
        assert first == {"text": "What is 0 plus 0? It is 0."}
    else:
        assert first["messages"][-2:] == [{"role": "user", "content": "What is 0 plus 0?"},
                                          {"role": "assistant", "content": "It is 0."}]


def test_alpaca_input_joins_the_instruction_and_a_json_array_reads_too(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Translate", "input": "chat", "output": "cat"}]))
    dataset = read_dataset(path)
    assert dataset.examples[0]["messages"][0] == {"role": "user", "content": "Translate\n\nchat"}


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@pytest.mark.parametrize("bad_line, message", [
    ('{"messages": [', "line 3: not valid JSON"),
    ('[1, 2]', "line 3: not a JSON object but list"),
    ('{"prompt": "x"}', "line 3: missing field 'messages' (OpenAI chat format)"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "line 3: messages[1] has unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}',
     "line 3: messages[1].content is empty"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "line 3: no assistant turn: nothing to learn from"),
    ('{"messages": []}', "line 3: 'messages' must be a non-empty list"),
    ('{"messages": [{"content": "x"}]}', "line 3: messages[1] has no 'role'"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
     "line 3: messages[1].content is int, not text"),
])
def test_the_first_bad_line_is_reported_by_number_with_what_is_wrong(tmp_path, bad_line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n\n{bad_line}\n{GOOD}\n")  # line 2 is blank: skipped, still counted
    with pytest.raises(DatasetError) as caught:
        read_dataset(path)
    assert f"data.jsonl, {message}" in str(caught.value)


@pytest.mark.parametrize("fmt, bad, message", [
    ("sharegpt", {"conversations": [{"from": "alien", "value": "x"}]}, "record 2: conversations[1] has unknown role 'alien' in 'from'"),
    ("alpaca", {"instruction": "x"}, "record 2: missing field 'output' (Alpaca format)"),
    ("text", {"text": ""}, "record 2: text is empty"),
])
def test_other_formats_name_their_missing_or_wrong_fields(tmp_path, fmt, bad, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([records(fmt, 1)[0], bad]))
    with pytest.raises(DatasetError, match=re.escape(message)):
        read_dataset(path)


def test_missing_empty_unknown_and_binary_files_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="the dataset is empty"):
        read_dataset(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "odd.jsonl", [{"question": "x"}])
    with pytest.raises(DatasetError, match="line 1: unknown format"):
        read_dataset(tmp_path / "odd.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_dataset(tmp_path / "bin.jsonl")
    with pytest.raises(DatasetError, match="not a file"):
        read_dataset(tmp_path)


def test_chat_rows_are_learned_on_the_assistant_turns_only():
    tokenizer = make_tokenizer()
    template, own = chat_template(tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
                {"role": "assistant", "content": "Rome."}]
    text, spans = assistant_spans(tokenizer, template, messages)
    assert own and [text[a:b] for a, b in spans] == ["Paris.</s>", "Rome.</s>"]
    example = encode(tokenizer, template, {"messages": messages}, 1000)
    learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    assert tokenizer.decode(learned) == "Paris.</s>Rome.</s>"
    # Cut before the first reply starts: nothing left to learn.
    assert encode(tokenizer, template, {"messages": messages}, 3) is None
    plain = encode(tokenizer, template, {"text": "hello world"}, 1000)
    assert plain["labels"] == plain["input_ids"] and plain["input_ids"][-1] == tokenizer.eos_token_id


def test_validation_rows_are_held_out_only_when_there_are_enough():
    assert validation_count(19, 0.1) == 0
    assert validation_count(20, 0.01) == 1
    assert validation_count(1000, 0.05) == 50
    assert validation_count(1000, 0) == 0


def test_token_counts_come_from_the_base_models_tokenizer_in_a_subprocess(tmp_path, tiny_model_dir):
    data = write_dataset(tmp_path, "openai", rows=8)
    counted = token_stats_in_subprocess(tiny_model_dir, data, 16)
    assert re.match(r"\d+ tokens, mean \d+, longest \d+; 8 over 16 \(cut\); 8 left out", counted.summary), counted
    assert counted.stats.rows == 8 and counted.stats.mean_trained == 0 and counted.cpu_flops is None
    counted = token_stats_in_subprocess(tiny_model_dir, data, 4096, cpu_speed=True)
    assert counted.stats.unlearnable == 0 and counted.stats.mean_trained == counted.stats.total_tokens / 8
    assert counted.cpu_flops > 1e8  # any CPU of this century
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"text": "x"}, {"messages": 1}])
    with pytest.raises(DatasetError, match="line 2: missing field 'text'"):
        token_stats_in_subprocess(tiny_model_dir, broken, 16)
    with pytest.raises(DatasetError, match="OSError|Can't load|not"):
        token_stats_in_subprocess(tmp_path / "no-model", data, 16)
