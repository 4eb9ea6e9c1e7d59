"""Start-up checks: everything a job reads from the user, checked in seconds before any process starts.

    inputs = preflight.check(cfg)      # the trainer's first call; raises ConfigError (one line)

What a run would otherwise find out only inside the Ray actors, after Ray, Megatron and the engines
have started (20 s on a CPU box, minutes on a cluster), or as a traceback without a file name:

* the model directory (`actor.model_path`, and `rollout.model_path` when the engines start from
  another copy): it exists, its config.json is readable and names the sizes the model needs, the
  weights are complete (safetensors index and headers readable, every tensor the architecture's
  mapping needs present with the shape config.json implies; no weight data is read);
* the tokenizer loads and its vocabulary fits the model's (a larger one ends in an IndexError inside
  the engine);
* the parallel layout against the model (TP vs heads, PP x VPP vs layers, with the values that
  would work);
* the prompt files (`pipeline.data.load_prompts`: unreadable or empty files, no usable prompt).

`check` returns what it read (`Inputs`), so the trainer reads nothing twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, ConversionError

log = logging.getLogger(__name__)

# config.json fields the Megatron model and the mapping need, as positive integers
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(kw_only=True, slots=True)
class Inputs:
    """What the start-up checks read: the trainer uses these instead of reading the files again."""

    hf_config: dict  # the model's config.json
    tokenizer: Any  # transformers tokenizer of actor.model_path
    train: list  # list[pipeline.data.Prompt]
    train_report: Any  # pipeline.data.LoadReport of the train files
    eval: list  # list[pipeline.data.Prompt] (all of them; the trainer keeps trainer.eval_prompts)


def check(cfg) -> Inputs:
    """Run every start-up check of a training job; raise ConfigError naming the field and file."""
    from pipeline.actor.config import check_layout
    from pipeline.data import load_prompts

    cfg.check_job()
    hf_config = check_model_dir(cfg.actor.model_path, "actor.model_path")
    if cfg.rollout.model_path and Path(cfg.rollout.model_path) != Path(cfg.actor.model_path):
        other = check_model_dir(cfg.rollout.model_path, "rollout.model_path")
        if other["vocab_size"] != hf_config["vocab_size"] or other["model_type"] != hf_config["model_type"]:
            raise ConfigError(
                f"rollout.model_path={cfg.rollout.model_path} is a {other['model_type']} with vocab_size="
                f"{other['vocab_size']}, actor.model_path a {hf_config['model_type']} with "
                f"{hf_config['vocab_size']}: the engines must serve the model the actor trains"
            )
    check_layout(cfg.actor, hf_config, cfg.trainer.world_size)
    tokenizer = load_tokenizer(cfg.actor.model_path, hf_config, "actor.model_path")
    train, report = load_prompts(cfg.data.train_files, tokenizer, cfg.data, "data.train_files")
    log.info("train data: %s", report.summary())
    evals = (
        load_prompts(cfg.data.eval_files, tokenizer, cfg.data, "data.eval_files")[0]
        if cfg.data.eval_files
        else []
    )
    if cfg.trainer.eval_every and not evals:
        log.warning(
            "trainer.eval_every=%d but data.eval_files is empty: no evaluation will run; list held-out "
            "prompt files in data.eval_files, or set trainer.eval_every=0",
            cfg.trainer.eval_every,
        )
    return Inputs(hf_config=hf_config, tokenizer=tokenizer, train=train, train_report=report, eval=evals)


def check_model_dir(path: str, field: str) -> dict:
    """config.json and complete weights of a Hugging Face model directory; returns config.json."""
    from pipeline import conversion as cv
    from pipeline import hf_io
    from pipeline.actor.hf_mapping import UnsupportedArchitecture
    from pipeline.actor.hf_mapping.family import WeightsMismatch

    if not path:
        raise ConfigError(f"{field}: set the Hugging Face model directory")
    model = Path(path)
    if not model.exists():
        raise ConfigError(f"{field}={path}: no such directory")
    if not model.is_dir():
        raise ConfigError(f"{field}={path}: not a directory (expected a Hugging Face model directory)")
    try:
        hf_config = hf_io.read_config(model)
    except ConversionError as e:
        raise ConfigError(f"{field}: {e}") from None
    where = f"{field}: {model / 'config.json'}"
    if not isinstance(hf_config.get("model_type"), str):
        raise ConfigError(f'{where} has no model_type (e.g. "qwen2")')
    for key in _SIZES:
        value = hf_config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {key}={value!r}, expected a positive integer")
    try:
        cv.check_hf(hf_io.HFWeights(model), hf_config)
    except (ConversionError, WeightsMismatch, UnsupportedArchitecture) as e:
        raise ConfigError(f"{field}: {e}") from None
    except KeyError as e:  # a size the architecture's mapping needs
        raise ConfigError(
            f"{where} lacks {e.args[0]!r}, which model_type={hf_config['model_type']!r} needs"
        ) from None
    return hf_config


def load_tokenizer(path: str, hf_config: dict, field: str):
    """The directory's tokenizer, refused if it has more tokens than the model's vocabulary."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises OSError, ValueError, JSONDecodeError, ... for bad files
        raise ConfigError(
            f"{field}={path}: cannot load its tokenizer ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
        ) from None
    n, vocab = len(tokenizer), hf_config["vocab_size"]
    if n > vocab:
        raise ConfigError(
            f"{field}={path}: the tokenizer has {n} tokens but config.json has vocab_size={vocab}; token ids "
            f">= {vocab} would index past the embedding. Use the tokenizer the model was trained with"
        )
    return tokenizer
