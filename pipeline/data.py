"""Prompt datasets: jsonl or parquet rows with a prompt and a ground truth, made into token ids.

Layouts that work without configuration:

- DAPO-Math / verl: ``{"prompt": [{"role": "user", "content": ...}], "reward_model": {"ground_truth": ...}}``
- GSM8K: ``{"question": ..., "answer": "... #### 72"}`` (the ground truth is the text after ``####``)
- plain: ``{"prompt": "...", "answer": "..."}``

Files: JSON Lines (``.jsonl``, or ``.json`` holding JSON Lines or one JSON array of rows) and
parquet. Other layouts name their fields with dotted paths (``prompt_key="input.text"``).

Bad rows (a line that is not UTF-8 or not JSON, a row that is not an object, a missing field, an
empty prompt, a prompt longer than the limit) are counted, reported with file and line, and skipped:
they never reach the RL step. A file that cannot be read at all (missing, a directory, not parquet,
no rows) or that leaves no usable prompt is a `ConfigError` naming the file, raised while the job
starts (before Ray): an eval file that gives no prompt is an error too, never a silent "no evaluation".
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # jsonl or parquet files
    eval_files: list[str] = field(default_factory=list)  # held-out set for evaluation
    prompt_key: str | None = None  # dotted path; None = detect the layout (DAPO-Math, GSM8K, plain)
    answer_key: str | None = None  # dotted path to the ground truth; None = detect
    max_prompt_tokens: int = 512  # longer prompts are skipped (and reported)
    apply_chat_template: bool = True  # wrap string prompts as one user turn of the tokenizer's template
    system_prompt: str | None = None  # a first system turn unless the row has one (no template: first line)
    shuffle: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens={self.max_prompt_tokens}: must be >= 1")
        for f in (*self.train_files, *self.eval_files):
            if not f.endswith((".jsonl", ".json", ".parquet")):
                raise ConfigError(f"{f}: expected a .jsonl or .parquet file")


@dataclass(slots=True)
class Prompt:
    """One prompt ready for rollout."""

    uid: int  # stable id of the prompt (its index among kept rows)
    input_ids: list[int]
    ground_truth: str
    text: str  # the prompt as the model sees it (after the chat template)
    source: str  # "file:line" for error messages


@dataclass(slots=True)
class LoadReport:
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    problems: list[str] = field(default_factory=list)  # every skipped row: "file:line: reason"

    @property
    def examples(self) -> list[str]:
        return self.problems[:10]

    def add_skip(self, where: str, reason: str) -> None:
        self.skipped[reason.split(":")[0]] += 1
        self.problems.append(f"{where}: {reason}")

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.kept} prompts"
        parts = ", ".join(f"{n} {r}" for r, n in self.skipped.items())
        return f"{self.kept} prompts; skipped {sum(self.skipped.values())} ({parts}); e.g. " + "; ".join(
            self.examples[:3]
        )


def _get(row: Any, path: str):
    node = row
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(path)
    return node


def _detect(row: dict) -> tuple[Any, str]:
    """(prompt, ground_truth) of a row in one of the known layouts."""
    if "reward_model" in row and "prompt" in row:  # DAPO-Math / verl
        return row["prompt"], str(_get(row, "reward_model.ground_truth"))
    if "question" in row and "answer" in row:  # GSM8K
        answer = str(row["answer"])
        return row["question"], answer.split("####")[-1].strip().replace(",", "")
    for p, a in (
        ("prompt", "answer"),
        ("prompt", "ground_truth"),
        ("problem", "answer"),
        ("problem", "solution"),
    ):
        if p in row and a in row:
            return row[p], str(row[a])
    raise KeyError("no known layout (DAPO-Math prompt/reward_model, GSM8K question/answer, prompt/answer)")


class _Unreadable(Exception):
    """A whole file cannot be read; the message says why (the caller adds the field and path)."""


def read_rows(path: str | Path):
    """Yield (line or row number, row, or the reason the row is unusable) from a dataset file.

    Raises `_Unreadable` for a file that cannot be read at all."""
    path = Path(path)
    if not path.exists():
        raise _Unreadable("does not exist")
    if not path.is_file():
        raise _Unreadable("is not a file")
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _Unreadable(f"cannot be read ({e.strerror})") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
    if path.suffix == ".json" and data.lstrip()[:1] == b"[":  # one JSON array of rows
        try:
            rows = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Unreadable(f"is not a valid JSON array ({e}); or write one JSON object per line") from None
        yield from enumerate(rows, start=1)
        return
    for i, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield i, ValueError(f"not UTF-8: byte {raw[e.start]:#04x} at column {e.start + 1}")
            continue
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, ValueError(f"invalid JSON: {e}")


def _parquet_rows(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise _Unreadable(f"is not a readable parquet file ({' '.join(str(e).split())})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _render(prompt: Any, tokenizer, cfg: DataConfig) -> str:
    if isinstance(prompt, list):  # chat messages
        for i, m in enumerate(prompt, start=1):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise TypeError(f"message {i} is not a {{'role': ..., 'content': ...}} mapping: {m!r}")
            if not isinstance(m.get("content"), str):
                raise TypeError(f"message {i} has no text 'content': {m!r}")
        messages = [dict(m) for m in prompt]
    elif isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        raise TypeError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if cfg.system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    if cfg.apply_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(str(m["content"]) for m in messages)


def load_prompts(
    files: list[str], tokenizer, cfg: DataConfig, field: str = "data.train_files"
) -> tuple[list[Prompt], LoadReport]:
    """Load, render and tokenize every row; skip and report bad ones.

    Raises ConfigError naming `field` and the file for a file that cannot be read, has no rows, or
    leaves no usable prompt."""
    report = LoadReport()
    prompts: list[Prompt] = []
    for file in files:
        before, rows = len(prompts), 0
        try:
            for line, row in read_rows(file):
                rows += 1
                _add_row(prompts, report, f"{file}:{line}", row, tokenizer, cfg)
        except _Unreadable as e:
            raise ConfigError(f"{field}: {file} {e}") from None
        if rows == 0:
            raise ConfigError(f"{field}: {file} has no rows")
        if len(prompts) == before:
            bad = [p for p in report.problems if p.startswith(f"{file}:")]
            raise ConfigError(
                f"{field}: {file} has no usable prompt: all {rows} rows were skipped, e.g. {bad[0]}"
                + ("" if cfg.prompt_key or cfg.answer_key else " (set data.prompt_key / data.answer_key?)")
            )
    report.kept = len(prompts)
    if report.skipped:
        more = len(report.problems) - len(report.examples)
        log.warning(
            "dataset %s: %s\n  %s%s",
            ",".join(files),
            report.summary(),
            "\n  ".join(report.examples),
            f"\n  ... and {more} more" if more else "",
        )
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(prompts)
    return prompts, report


def _add_row(prompts: list[Prompt], report: LoadReport, where: str, row, tokenizer, cfg: DataConfig) -> None:
    """Append the prompt of one row, or count and report why the row is skipped."""
    if isinstance(row, Exception):
        report.add_skip(where, str(row))
        return
    if not isinstance(row, dict):
        report.add_skip(where, f"not an object: the row is a JSON {type(row).__name__}, expected {{...}}")
        return
    try:
        if cfg.prompt_key or cfg.answer_key:
            prompt = _get(row, cfg.prompt_key) if cfg.prompt_key else _detect(row)[0]
            answer = _get(row, cfg.answer_key) if cfg.answer_key else _detect(row)[1]
        else:
            prompt, answer = _detect(row)
    except KeyError as e:
        report.add_skip(where, f"missing field: {e.args[0]}")
        return
    if answer is None or str(answer).strip() in ("", "None"):
        report.add_skip(where, "missing field: empty ground truth")
        return
    try:
        text = _render(prompt, tokenizer, cfg)
    except Exception as e:  # a malformed message list or a chat template that rejects the row
        report.add_skip(where, f"bad prompt: {type(e).__name__}: {e}")
        return
    if not text.strip():
        report.add_skip(where, "bad prompt: empty")
        return
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > cfg.max_prompt_tokens:
        report.add_skip(where, f"prompt too long: {len(ids)} > max_prompt_tokens={cfg.max_prompt_tokens}")
        return
    prompts.append(Prompt(len(prompts), list(ids), str(answer).strip(), text, where))


class PromptSampler:
    """Endless, seeded, epoch-wise iteration over prompts; its position is checkpointable."""

    def __init__(self, prompts: list[Prompt], seed: int = 0):
        if not prompts:
            raise ValueError("no prompts to sample from (every row was skipped or the file list is empty)")
        self.prompts, self.seed = prompts, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[Prompt]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self.prompts[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm()
