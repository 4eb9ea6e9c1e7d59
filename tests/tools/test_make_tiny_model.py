"""tools/make_tiny_model.py: the Countdown task, its tokenizer, and a warm-up reproducible by seed."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import make_tiny_model  # noqa: E402

from pipeline.rewards.countdown import countdown_reward  # noqa: E402
from pipeline.tiny import bpe_tokenizer  # noqa: E402

SMALL = ["--task", "countdown", "--hidden", "32", "--layers", "2", "--max-steps", "12", "--batch-size", "8",
         "--n-train-prompts", "40", "--n-eval-prompts", "8", "--min-acc", "-1"]  # fmt: skip


def test_countdown_expressions_are_every_order_without_a_negative_running_value():
    found = make_tiny_model.expressions((1, 2, 3))
    assert found[6] == ["1+2+3", "1+3+2", "2+1+3", "2+3+1", "3+1+2", "3+2+1"]
    assert found[0] == ["1+2-3", "2+1-3", "3-1-2", "3-2-1"]
    assert found[2] == ["1+3-2", "3+1-2", "3-2+1"]  # not 1-2+3: its running value goes below 0
    assert found[4] == ["2+3-1", "2-1+3", "3+2-1", "3-1+2"]
    assert sorted(found) == [0, 2, 4, 6]


def test_countdown_problems_have_every_solution_right_and_the_target_in_range():
    args = make_tiny_model.parse_args(["--out-dir", "x", "--task", "countdown"])
    task = make_tiny_model.Countdown(args)
    rng = random.Random(0)
    for _ in range(50):
        question, truth = task.problem(rng)
        numbers = [int(x) for x in question.split(" with ")[1].split()]
        target = int(question.split()[1])
        assert len(numbers) == 4 and all(1 <= n <= 20 for n in numbers) and 1 <= target <= 80
        for expr in make_tiny_model.expressions(tuple(numbers))[target]:
            assert countdown_reward(expr, truth)["acc"] == 1.0
        assert countdown_reward(task.solution(rng, question, truth), truth)["acc"] == 1.0


def test_bpe_tokenizer_has_every_number_below_1000_as_one_token_and_round_trips():
    tok = bpe_tokenizer(["Make 38 with 13 14 2 9", "13+14+2+9", "hello world"] * 5, vocab_size=2000)
    assert all(len(tok.tokenize(str(n))) == 1 for n in range(1000))
    assert tok.tokenize("1234") == ["123", "4"]  # numbers split in chunks of three digits
    text = tok.apply_chat_template([{"role": "user", "content": "Make 38 with 13 14 2 9"}], tokenize=False)
    ids = tok(text + "13+14+2+9", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text + "13+14+2+9"
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>" and 1000 < len(tok) <= 2000


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for name in ("model/model.safetensors", "model/tokenizer.json", "train.jsonl", "eval.jsonl"):
        h.update((out / name).read_bytes())
    return h.hexdigest()


def test_countdown_warm_up_is_reproducible_by_seed(tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert make_tiny_model.main(["--out-dir", str(tmp_path / name), "--seed", seed, *SMALL]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    report = json.loads((tmp_path / "a" / "make_tiny_model.json").read_text())
    assert report["task"] == "countdown" and report["steps"] == 12 and report["response_entropy"] > 0
    train = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 40 and train[0]["prompt"].startswith("Make ") and " from " in train[0]["answer"]
    # an existing model is kept
    assert make_tiny_model.main(["--out-dir", str(tmp_path / "a"), "--seed", "5", *SMALL]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
