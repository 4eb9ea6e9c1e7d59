"""One typed configuration tree, loaded from a YAML recipe and overridden with dotted arguments.

Each component owns its dataclass in its own module (`pipeline.algorithms.config.LossConfig`, ...);
this module assembles them into `Config` and provides the loader:

    cfg = load(Config, "configs/demo_cpu.yaml", ["loss.method=clip_cov", "actor.tp=2"])

Every dataclass may define `validate(self)`; it is called for the whole tree after loading and
raises `ConfigError` naming the field (`loss.clip_ratio_low`) and what would work.

Rules the loader applies to every field, so no section repeats them: a number must be finite (NaN
and inf are refused wherever a number is read); a recipe must be a UTF-8 YAML file without
duplicate keys; an override value that is not valid YAML is taken as the literal string.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML says the last one wins,
    which silently drops the first setting)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges are deliberate
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in seen:
                raise yaml.YAMLError(
                    f"line {line}: duplicate key {key!r} (first on line {seen[key]}); keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a YAML/CLI value into the annotated type `tp`, or raise ConfigError naming `where`.

    The one place numbers are read: a NaN or infinite number is refused for every field."""
    out = _convert(value, tp, where)
    if isinstance(out, float) and not math.isfinite(out):
        raise ConfigError(f"{where}: got {out}; expected a finite number")
    return out


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be None")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: got {value!r}; expected one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = _yaml(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"{where}: {value!r} is not a valid list ({_one_line(e)})") from None
        elif isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, where): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        if isinstance(value, dict | list | tuple):  # nested numbers are numbers too
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                _coerce(v, Any, f"{where}.{k}" if isinstance(value, dict) else f"{where}[{k}]")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value) if isinstance(value, int) else int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


# Keys that were removed with the key that replaced them: a recipe that still sets one is refused
# with a pointer to the new one (one knob per thing).
REPLACED = {
    "trainer.sync_bucket_mb": "rollout.bucket_bytes (in bytes: 512 MB = 536870912)",
    "rollout.verify_tolerance": "trainer.sync_tolerance",
}


def _build(cls, data: dict, where: str = ""):
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        for u in unknown:
            if prefix + u in REPLACED:
                raise ConfigError(f"{prefix + u} was replaced by {REPLACED[prefix + u]}; set that instead")
        raise ConfigError(
            f"unknown field(s) {', '.join(prefix + u for u in unknown)}; "
            f"{cls.__name__} has: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(cls, data: dict | None):
    """Build dataclass `cls` from a nested mapping, checking names and types."""
    return _build(cls, data or {})


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = _yaml(raw) if raw != "" else ""
        except yaml.YAMLError:  # `data.system_prompt=Answer: [x`: the literal text
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return data


def validate_tree(cfg, where: str = "") -> None:
    """Call `validate()` on every dataclass in the tree, children first."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate_tree(v, f"{where}.{f.name}" if where else f.name)
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{where + ': ' if where else ''}{e}") from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A recipe as a mapping. `base: other.yaml` (relative to this file) is loaded first and this
    file's sections are merged over it, field by field."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(
            f"config file {path} is not a file; pass a YAML recipe such as configs/demo_cpu.yaml"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save the recipe as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read it ({e.strerror})") from None
    try:
        data = _yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected the path of another recipe, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in _seen:
        raise ConfigError(f"{path}: base {base} includes itself")
    return _merge(load_yaml(base_path, (*_seen, path.resolve())), data)


def load(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Load `cls` from a YAML file plus dotted overrides, then validate the whole tree."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides or [])
    try:
        cfg = from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path or '<overrides>'}: {e}") from None
    validate_tree(cfg)
    return cfg


# The root of the tree: one field per component. Imported here, at the bottom, so that this
# module's loader is defined before the components' modules (which import only pipeline.errors).
from pipeline.actor.config import ActorConfig  # noqa: E402
from pipeline.algorithms.config import AdvantageConfig, EntropyControlConfig, LossConfig  # noqa: E402
from pipeline.data import DataConfig  # noqa: E402
from pipeline.rewards.compute import RewardConfig  # noqa: E402
from pipeline.rollout.config import RolloutConfig  # noqa: E402
from pipeline.trainer_config import TrainerConfig  # noqa: E402


@dataclasses.dataclass(kw_only=True, slots=True)
class Config:
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)  # the RL loop
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # prompt datasets
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)  # verifiable rewards
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)  # engines and sync
    actor: ActorConfig = dataclasses.field(default_factory=ActorConfig)  # the Megatron actor
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)  # policy loss (method, clips, agg)
    advantage: AdvantageConfig = dataclasses.field(default_factory=AdvantageConfig)  # outcome advantages
    entropy_control: EntropyControlConfig = dataclasses.field(default_factory=EntropyControlConfig)  # Skywork

    def __post_init__(self) -> None:
        # One model path for the whole job unless the rollout engines start from another copy.
        if not self.rollout.model_path:
            self.rollout.model_path = self.actor.model_path

    def check_job(self) -> None:
        """What a training job needs beyond a valid tree: a model and prompts (`train` calls this)."""
        if not self.actor.model_path:
            raise ConfigError("actor.model_path: set the Hugging Face model directory to train")
        if not self.data.train_files:
            raise ConfigError("data.train_files: list at least one .jsonl or .parquet file of prompts")

    def validate(self) -> None:
        """Checks across sections (each section validated its own fields already)."""
        if self.rollout.engine == "sglang" and self.actor.temperature != 1.0:
            raise ConfigError(
                f"actor.temperature={self.actor.temperature} with rollout.engine=sglang: the servers' "
                "teacher-forced log-probs (weight-sync check) are at temperature 1; use 1.0 or the local engine"
            )
        t = self.trainer
        if t.world_size % (self.actor.tp * self.actor.pp):
            raise ConfigError(
                f"trainer.world_size={t.world_size} must be a multiple of actor.tp x actor.pp = "
                f"{self.actor.tp * self.actor.pp}"
            )
        dp = t.world_size // (self.actor.tp * self.actor.pp)
        rows = t.prompts_per_step * t.samples_per_prompt // t.mini_batches_per_step
        if rows < dp:
            raise ConfigError(
                f"a mini-batch of {rows} samples (trainer.prompts_per_step x samples_per_prompt / "
                f"mini_batches_per_step) cannot give each of the {dp} data-parallel ranks a sample"
            )
