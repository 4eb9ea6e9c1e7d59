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


# ---------------------------------------------------------------------- every row problem is skipped (issue 16 item 4)

GOOD = {"prompt": "1+1=?", "answer": "2"}


def test_non_utf8_lines_scalar_rows_and_malformed_messages_are_skipped_with_file_and_line(tmp_path, tok):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps(GOOD).encode(),
        b'{"prompt": "caf\xe9", "answer": "1"}',  # latin-1, not UTF-8
        b"42",  # a JSON scalar
        b'"just a string"',
        b"[1, 2]",
        json.dumps({"prompt": ["not a message"], "answer": "1"}).encode(),
        json.dumps({"prompt": [{"role": "user"}], "answer": "1"}).encode(),  # no content
        json.dumps({"prompt": "3+3=?", "answer": None}).encode(),
        json.dumps(GOOD).encode(),
    ]
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # with a byte-order mark
    prompts, report = load_prompts([str(path)], tok, DataConfig(shuffle=False))
    assert report.kept == 2 and sum(report.skipped.values()) == 7 == len(report.problems)
    assert [p.source for p in prompts] == [f"{path}:1", f"{path}:9"]
    assert f"{path}:2: not UTF-8: byte 0xe9 at column 16" in report.problems
    assert report.skipped["not an object"] == 3 and f"{path}:3: not an object" in report.problems[1]
    assert report.skipped["bad prompt"] == 2 and report.skipped["missing field"] == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"", "has no rows"),
        (b"\n\n", "has no rows"),
        (b"{not json\n42\n", r"has no usable prompt: all 2 rows were skipped, e\.g\. .*:1: invalid JSON"),
        (b'{"x": 1}\n', "has no usable prompt.*missing field.*set data.prompt_key"),
    ],
)
def test_a_file_that_gives_no_prompt_is_one_clear_error_naming_the_field_and_file(
    tmp_path, tok, content, message
):
    path = tmp_path / "train.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^data.eval_files: {path} {message}"):
        load_prompts([str(path)], tok, DataConfig(), field="data.eval_files")


def test_a_file_that_is_not_parquet_or_a_directory_is_one_clear_error(tmp_path, tok):
    fake = tmp_path / "d.parquet"
    fake.write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(
        ConfigError, match=r"^data.train_files: .*d\.parquet is not a readable parquet file \("
    ):
        load_prompts([str(fake)], tok, DataConfig())
    folder = tmp_path / "dir.jsonl"
    folder.mkdir()
    with pytest.raises(ConfigError, match="dir.jsonl is not a file"):
        load_prompts([str(folder)], tok, DataConfig())
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"empty\.jsonl has no rows"):  # one empty file among good ones
        load_prompts([good, str(tmp_path / "empty.jsonl")], tok, DataConfig())


def test_json_array_files_load_like_json_lines(tmp_path, tok):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD, 7, {"question": "2+2=?", "answer": "#### 4"}], indent=2))
    prompts, report = load_prompts([str(path)], tok, DataConfig(shuffle=False))
    assert [p.ground_truth for p in prompts] == ["2", "4"] and report.problems[0].startswith(
        f"{path}:2: not an"
    )
