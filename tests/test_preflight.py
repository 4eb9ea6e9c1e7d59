"""Start-up checks (issue 16 item 5): a bad model directory, tokenizer or layout is one line naming the
file and field, raised in seconds before Ray starts, never a traceback from inside the engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pipeline.config import Config, ConfigError, load
from pipeline.preflight import check
from pipeline.tiny import char_tokenizer
from tests.actor.tiny_hf import make_tiny_hf

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A 3-layer Qwen2 like the demo's (vocab 250) with the demo's character tokenizer (84 tokens)."""
    path = make_tiny_hf(tmp_path_factory.mktemp("m") / "model", "qwen2", num_hidden_layers=3)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture()
def job(model, tmp_path):
    """A copy of the model and one prompt file; returns (model dir, overrides -> Config)."""
    m = tmp_path / "model"
    shutil.copytree(model, m)
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "1+1=?", "answer": "2"}) + "\n")

    def cfg(*overrides: str) -> Config:
        base = [f"actor.model_path={m}", f"data.train_files=[{tmp_path / 'train.jsonl'}]", "actor.tp=1"]
        base += ["trainer.world_size=1", "actor.micro_batch_size=1", "trainer.eval_every=0"]
        return load(Config, None, [*base, *overrides])

    return m, cfg


def test_a_good_job_passes_and_returns_what_it_read(job):
    _, cfg = job
    inputs = check(cfg())
    assert inputs.hf_config["num_hidden_layers"] == 3 and len(inputs.train) == 1 and inputs.eval == []
    assert inputs.tokenizer.decode(inputs.train[0].input_ids).endswith("assistant\n")


def _fails(cfg: Config, pattern: str) -> str:
    with pytest.raises(ConfigError, match=pattern) as e:
        check(cfg)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_missing_or_empty_model_directory_names_the_field(job, tmp_path):
    _, cfg = job
    _fails(cfg(f"actor.model_path={tmp_path / 'nope'}"), r"^actor\.model_path=.*nope: no such directory$")
    (tmp_path / "empty").mkdir()
    _fails(cfg(f"actor.model_path={tmp_path / 'empty'}"), r"^actor\.model_path: .*empty: no config\.json")


def test_a_corrupt_config_json_names_the_file(job):
    m, cfg = job
    text = (m / "config.json").read_text()
    (m / "config.json").write_text(text[: len(text) // 2])
    _fails(cfg(), rf"^actor\.model_path: {m}/config\.json: not valid JSON \(.*line")
    (m / "config.json").write_text(json.dumps({**json.loads(text), "num_hidden_layers": "3"}))
    _fails(cfg(), r"config\.json: num_hidden_layers='3', expected a positive integer")


def test_truncated_or_incomplete_weights_name_the_file(job):
    m, cfg = job
    weights = m / "model.safetensors"
    tensors = {k: v.clone() for k, v in load_file(weights).items()}  # not backed by the file
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _fails(cfg(), rf"^actor\.model_path: {weights}: cannot read this safetensors file .*is it complete\?$")
    dropped = sorted(tensors)[3]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(weights))
    _fails(cfg(), rf"do not match config\.json .*missing 1 tensor\(s\), e\.g\. \['{dropped}'\]")


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(job):
    m, cfg = job
    tok = char_tokenizer()
    tok.add_tokens([f"<extra_{i}>" for i in range(200)])
    tok.save_pretrained(m)
    assert len(tok) == 284  # 84 characters and specials + 200 > vocab_size 250
    _fails(cfg(), r"the tokenizer has 284 tokens but config\.json has vocab_size=250; token ids >= 250")


def test_pp_that_does_not_divide_the_layers_fails_before_ray_with_the_layouts_that_work(job):
    _, cfg = job
    msg = _fails(cfg("actor.pp=2", "trainer.world_size=2"), r"num_hidden_layers=3 must be divisible")
    assert msg.endswith("with tp=1 on 2 ranks these work: pp=1")


def test_an_empty_eval_file_is_an_error(job, tmp_path):
    _, cfg = job
    (tmp_path / "eval.jsonl").write_text("")
    _fails(
        cfg(f"data.eval_files=[{tmp_path / 'eval.jsonl'}]"), r"^data\.eval_files: .*eval\.jsonl has no rows$"
    )


def test_train_fails_in_seconds_with_one_line_exit_2_and_starts_nothing(job, tmp_path):
    """The real command, as a user runs it: no traceback, no run directory, no Ray."""
    m, _ = job
    (m / "model.safetensors").unlink()
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", "configs/demo_cpu.yaml",
         f"actor.model_path={m}", f"trainer.run_dir={run_dir}", "trainer.make_tiny_model_dir=null"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    err = [line for line in r.stderr.splitlines() if not line.startswith("WARNING")]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert err[0] == f"configuration error: actor.model_path: {m}: no *.safetensors weights found"
    assert not run_dir.exists() and "ray" not in r.stdout.lower() and elapsed < 60, elapsed
