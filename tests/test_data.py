"""Prompt datasets: DAPO-Math, GSM8K and plain layouts, jsonl and parquet, bad rows reported and skipped."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError
from pipeline.data import DataConfig, PromptSampler, load_prompts
from pipeline.tiny import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_known_layouts_load_with_chat_template(tmp_path, tok):
    f = write_jsonl(
        tmp_path / "mix.jsonl",
        [
            {"prompt": [{"role": "user", "content": "1+1=?"}], "reward_model": {"ground_truth": "2"}},
            {"question": "2+2=?", "answer": "two and two\n#### 4"},
            {"prompt": "3+3=?", "answer": "6"},
        ],
    )
    prompts, report = load_prompts([f], tok, DataConfig(shuffle=False))
    assert report.kept == 3 and not report.skipped
    assert [p.ground_truth for p in prompts] == ["2", "4", "6"]
    assert prompts[1].text == "<|im_start|>user\n2+2=?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(prompts[1].input_ids) == prompts[1].text
    assert prompts[0].source.endswith("mix.jsonl:1")


def test_bad_rows_are_counted_reported_with_file_and_line_and_skipped(tmp_path, tok, caplog):
    f = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "1+1=?", "answer": "2"},
            {"prompt": "no answer here"},
            "{not json",
            {"prompt": "9" * 100, "answer": "1"},
            {"prompt": "", "answer": "1"},
        ],
    )
    prompts, report = load_prompts([f], tok, DataConfig(max_prompt_tokens=64, apply_chat_template=False))
    assert report.kept == 1 and sum(report.skipped.values()) == 4
    assert report.skipped["missing field"] == 1 and report.skipped["prompt too long"] == 1
    assert any("bad.jsonl:2: missing field" in e for e in report.examples)
    assert any("bad.jsonl:3: invalid JSON" in e for e in report.examples)
    assert any(
        e.endswith("bad.jsonl:4: prompt too long: 100 > max_prompt_tokens=64") for e in report.examples
    )
    assert "skipped 4" in caplog.text


def test_parquet_and_dotted_keys(tmp_path, tok):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"x": {"q": "5*5=?"}, "y": "25"}]), path)
    prompts, _ = load_prompts([str(path)], tok, DataConfig(prompt_key="x.q", answer_key="y"))
    assert prompts[0].ground_truth == "25" and "5*5=?" in prompts[0].text


def test_sampler_is_seeded_epochwise_and_resumable(tmp_path, tok):
    f = write_jsonl(tmp_path / "s.jsonl", [{"prompt": f"{i}+0=?", "answer": str(i)} for i in range(5)])
    prompts, _ = load_prompts([f], tok, DataConfig())
    a = PromptSampler(prompts, seed=3)
    first = [p.uid for p in a.next(7)]
    state = a.state_dict()
    rest = [p.uid for p in a.next(6)]
    b = PromptSampler(prompts, seed=3)
    b.load_state_dict(state)
    assert [p.uid for p in b.next(6)] == rest
    assert sorted(first[:5]) == list(range(5))  # one epoch covers every prompt once


def test_config_rejects_unknown_file_types():
    with pytest.raises(ConfigError, match="jsonl or .parquet"):
        DataConfig(train_files=["x.csv"]).validate()
