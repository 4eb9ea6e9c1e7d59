"""Helpers for the tests that start real SGLang servers on CPU (see shared docs cpu-recipes.md).

The servers run in `.venv/sglang-server` (made by tools/setup_sglang.sh) with the `sgl_kernel` test
double of tests/support on their PYTHONPATH only. Models are tiny Qwen2s made here, saved with the
char-level tokenizer so that SGLang can load the directory; prompts always travel as token ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.rollout import LocalEngine, RolloutConfig
from pipeline.tiny import char_tokenizer
from tests.rollout.test_local_engine import tiny_qwen2

ROOT = Path(__file__).resolve().parents[2]
SERVER_PYTHON = Path(
    os.environ.get("SGLANG_SERVER_PYTHON", ROOT / ".venv" / "sglang-server" / "bin" / "python")
)
SHIM = ROOT / "tests" / "support"

needs_sglang = pytest.mark.skipif(
    not SERVER_PYTHON.exists(), reason="no .venv/sglang-server: run bash tools/setup_sglang.sh"
)


def save_tiny_model(path: Path, seed: int) -> tuple[Path, torch.nn.Module]:
    tok = char_tokenizer()
    model = tiny_qwen2(len(tok), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


def sglang_config(model_path: Path, **overrides) -> RolloutConfig:
    cfg = dict(
        model_path=str(model_path),
        python=str(SERVER_PYTHON),
        pythonpath=[str(SHIM)],
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        startup_timeout_s=240.0,
        # SGLang checks that weights leave room under this fraction by measuring free host memory
        # before and after loading: with colleagues' tests allocating meanwhile, 0.05 is flaky.
        mem_fraction_static=0.3,
    )
    return RolloutConfig(**{**cfg, **overrides})


def teacher_forced(model, sequences, prompt_lens, temperature=1.0):
    """fp32 log-probs of the response tokens under `model` (the trainer's view)."""
    return LocalEngine(model, char_tokenizer()).logprobs(sequences, prompt_lens, temperature)


def state_stream(model):
    """The HF state dict as the export generator yields it: (hf_name, tensor), tied lm_head left out."""
    tied = model.config.tie_word_embeddings
    return (
        (k, v.detach().clone()) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")
    )


def prompts(n: int, seed: int = 0, vocab: int = 80) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(4, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]
