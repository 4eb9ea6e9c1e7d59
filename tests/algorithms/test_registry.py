"""The method registry (`pipeline/algorithms/methods/`): every registered method keeps the
prepare/apply contract and declares exactly what it reads; the registry is the only list of method
names; adding a method is one new module."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.algorithms import LossConfig, apply_loss, finish_metrics, policy_loss, prepare_loss, total_sums
from pipeline.algorithms.methods import METHODS, get_method
from pipeline.errors import ConfigError
from tests.algorithms.common import D

ROOT = Path(__file__).resolve().parents[2]
NAMES = sorted(METHODS)


def flat_batch(seed: int, n_seqs: int = 6) -> dict:
    """A random flat batch: sequences of random length back to back in a random token order, with a
    few masked-out tokens (garbage values), one sequence id per sequence."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n_seqs,), generator=g)
    segments = torch.repeat_interleave(torch.arange(n_seqs), lengths)
    n = segments.numel()
    mask = torch.rand(n, generator=g) > 0.15
    adv = (torch.randint(-4, 5, (n_seqs,), generator=g).to(D) / 2)[segments]
    log_prob = -torch.rand(n, generator=g, dtype=D) * 4 - 0.05
    old = log_prob + 0.3 * torch.randn(n, generator=g, dtype=D)
    entropy = torch.rand(n, generator=g, dtype=D) * 2 + 0.01
    ref = log_prob + 0.2 * torch.randn(n, generator=g, dtype=D)
    old[~mask], entropy[~mask] = float("nan"), float("inf")
    perm = torch.randperm(n, generator=g)
    batch = dict(log_prob=log_prob, old_log_prob=old, advantages=adv * mask, response_mask=mask.long(),
                 entropy=entropy, ref_log_prob=ref, segments=segments)  # fmt: skip
    batch = {k: v[perm] for k, v in batch.items()}
    return batch | {"sample_ids": torch.randperm(100, generator=g)[:n_seqs] + 3}


def contract_cfg(name: str) -> LossConfig:
    """The method with its defaults, plus an entropy bonus and a reference KL (every apply term on)."""
    return LossConfig(method=name, entropy_coef=0.01, kl_coef=0.05, seed=2)


def whole(cfg: LossConfig, b: dict):
    lp, ent = b["log_prob"].clone().requires_grad_(True), b["entropy"].clone().requires_grad_(True)
    loss, metrics = policy_loss(cfg, lp, b["old_log_prob"], b["advantages"], b["response_mask"], entropy=ent,
                                ref_log_prob=b["ref_log_prob"], segments=b["segments"],
                                sample_ids=b["sample_ids"], step=5)  # fmt: skip
    return (loss.detach(), *torch.autograd.grad(loss, (lp, ent)), metrics)


def split(cfg: LossConfig, b: dict, cut: int):
    """One prepare over the whole batch, apply on tokens [:cut] and [cut:]."""
    lp, ent = b["log_prob"].clone().requires_grad_(True), b["entropy"].clone().requires_grad_(True)
    plan = prepare_loss(cfg, b["log_prob"], b["old_log_prob"], b["advantages"], b["response_mask"],
                        entropy=b["entropy"], ref_log_prob=b["ref_log_prob"], segments=b["segments"],
                        sample_ids=b["sample_ids"], step=5)  # fmt: skip
    total, sums = torch.zeros((), dtype=D), []
    for t in (slice(0, cut), slice(cut, None)):
        loss, s = apply_loss(cfg, plan.rows(t), lp[t], b["old_log_prob"][t], b["advantages"][t],
                             b["response_mask"][t], entropy=ent[t], ref_log_prob=b["ref_log_prob"][t])  # fmt: skip
        total, _ = total + loss, sums.append(s)
    return (
        total.detach(),
        *torch.autograd.grad(total, (lp, ent)),
        finish_metrics(cfg, plan, total_sums(sums)),
    )


# --- (a) every registered method keeps the contract ----------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_method_split_into_micro_batches_sums_to_its_whole_batch_loss(name):
    cfg = contract_cfg(name)
    b = flat_batch(0)
    loss, g_lp, g_ent, metrics = whole(cfg, b)
    for cut in (5, b["log_prob"].numel() // 2):
        s_loss, s_lp, s_ent, s_metrics = split(cfg, b, cut)
        assert torch.isfinite(loss) and s_loss.item() == pytest.approx(loss.item(), abs=1e-12)
        torch.testing.assert_close(s_lp, g_lp, atol=1e-12, rtol=0)
        torch.testing.assert_close(s_ent, g_ent, atol=1e-12, rtol=0)
        assert set(s_metrics) == set(metrics)
        for key, value in metrics.items():
            assert s_metrics[key] == pytest.approx(value, abs=1e-12), key
    assert torch.isfinite(g_lp).all() and torch.isfinite(g_ent).all()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics


@pytest.mark.parametrize("name", NAMES)
def test_every_methods_metric_names_do_not_depend_on_the_data(name):
    keys = [set(whole(contract_cfg(name), flat_batch(seed))[3]) for seed in (0, 1, 2)]
    assert keys[0] == keys[1] == keys[2]
    assert {"loss", "pg_loss", "ppo_kl", "entropy", "kl", "n_tokens"} <= keys[0]


def _plan_args(b: dict, **given):
    args = [given.get("log_prob", b["log_prob"]), b["old_log_prob"], b["advantages"], b["response_mask"]]
    kw = dict(entropy=given.get("entropy", b["entropy"]), ref_log_prob=given.get("ref_log_prob", b["ref_log_prob"]),
              segments=b["segments"], sample_ids=b["sample_ids"])  # fmt: skip
    return args, kw


def _signature(plan) -> list:
    """What the method made of the batch: weights, its own tensors, its metrics (not by_entropy/*,
    which the shared code computes from any entropies given)."""
    tensors = [plan.pg_weight, plan.kl_weight, *(plan.tensors[k] for k in sorted(plan.tensors))]
    metrics = {k: v for k, v in plan.metrics.items() if not k.startswith("by_entropy/")}
    return [None if t is None else t.tolist() for t in tensors] + [metrics]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("need", ["log_prob", "entropy"])
def test_every_method_reads_the_current_policy_exactly_when_it_declares_it(name, need):
    method, cfg = get_method(name), LossConfig(method=name, archer_kl_coef_low_entropy=0.0)
    declared = method.needs_log_prob if need == "log_prob" else method.needs_entropy
    b = flat_batch(3)
    args, kw = _plan_args(b, **{need: None})
    if declared:
        with pytest.raises(ValueError, match=f"{need} .*required by method={name}"):
            prepare_loss(cfg, *args, **kw)
        g = torch.Generator().manual_seed(4)
        other = b[need] + torch.rand(b[need].shape, generator=g, dtype=D)  # other values: the plan changes
        a, k = _plan_args(b, **{need: other})
        assert _signature(prepare_loss(cfg, *_plan_args(b)[0], **_plan_args(b)[1])) != _signature(
            prepare_loss(cfg, *a, **k)
        )
    else:
        prepare_loss(cfg, *args, **kw)  # works without it (and never sees it: MiniBatch holds None)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_needs_a_reference_exactly_when_it_declares_it(name):
    method = get_method(name)
    b = flat_batch(3)
    for cfg in (LossConfig(method=name), LossConfig(method=name, archer_kl_coef_low_entropy=0.0)):
        args, kw = _plan_args(b, ref_log_prob=None)
        if method.needs_reference(cfg):
            with pytest.raises(ValueError, match=f"ref_log_prob is required by method={name}"):
                prepare_loss(cfg, *args, **kw)
        else:
            prepare_loss(cfg, *args, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_module_states_its_formula_and_paper(name):
    doc = sys.modules[get_method(name).per_token.__module__].__doc__
    assert "arXiv" in doc and "l_t" in doc, name


# --- (b) the registry is the only list of names ----------------------------------------------------

# The one exception: LossConfig's default `method: str = "ppo"` must name a method, and config.py
# cannot import the registry at class definition (the registry imports config.py); validate() checks
# the default against the registry like any other value (test_the_default_method_is_registered).
ALLOWED = {("pipeline/algorithms/config.py", "ppo")}


def test_no_module_outside_the_registry_names_a_method():
    methods_dir = ROOT / "pipeline" / "algorithms" / "methods"
    found = set()
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if methods_dir in path.parents:
            continue
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and any(value == n or value.startswith(n + "/") for n in NAMES):
                found.add((rel, value, node.lineno))
    assert {(rel, value) for rel, value, _ in found} <= ALLOWED, sorted(found)
    assert len(found) == len(ALLOWED)


def test_the_default_method_is_registered():
    assert LossConfig().method in METHODS


def test_config_validation_reads_the_names_from_the_registry():
    for name in NAMES:
        LossConfig(method=name).validate()
    with pytest.raises(ConfigError, match=r"loss.method='nope': expected one of \['ppo', 'cispo'"):
        LossConfig(method="nope").validate()
    with pytest.raises(ValueError, match="unknown loss method 'nope'; expected one of"):
        get_method("nope")


# --- (c) adding a method is one file -------------------------------------------------------------

TOY = '''
"""Toy: vanilla policy gradient on the tokens of non-zero advantage only.

    l_t = -A_t log pi_t,   tokens with A_t = 0 dropped from the policy gradient (kept in the normaliser)
"""

import torch

from pipeline.algorithms.methods.base import Method, Prepared
from pipeline.errors import ConfigError


def per_token(cfg, plan, log_prob, old_log_prob, advantages):
    none = torch.zeros_like(log_prob, dtype=torch.bool)
    return -advantages * log_prob, none, none


def prepare(b):
    zero = b.mask & (b.advantages == 0)
    return Prepared(sums={"toy/zero_adv": zero.sum()}, keep=~zero, selected=zero)


def plan_metrics(v, n_tokens):
    return {"toy/zero_adv_frac": v.pop("toy/zero_adv") / n_tokens}


def validate(cfg):
    if cfg.seed < 0:
        raise ConfigError(f"loss.seed={cfg.seed}: the toy wants seed >= 0")


METHOD = Method(name="toy", per_token=per_token, prepare=prepare, validate=validate, plan_metrics=plan_metrics)
'''


def test_a_new_method_is_one_module_registered_in_one_line(tmp_path, monkeypatch):
    path = tmp_path / "toy.py"
    path.write_text(textwrap.dedent(TOY))
    spec = importlib.util.spec_from_file_location("toy_method", path)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    monkeypatch.setitem(METHODS, toy.METHOD.name, toy.METHOD)  # the one line in the registry

    LossConfig(method="toy").validate()
    with pytest.raises(ConfigError, match="loss.seed=-1: the toy wants seed >= 0"):
        LossConfig(method="toy", seed=-1).validate()
    cfg = dataclasses.replace(contract_cfg("toy"), kl_coef=0.0)
    b = flat_batch(0)
    loss, g_lp, _, metrics = whole(cfg, b)
    s_loss, s_lp, _, s_metrics = split(cfg, b, 7)
    assert s_loss.item() == pytest.approx(loss.item(), abs=1e-12)
    torch.testing.assert_close(s_lp, g_lp, atol=1e-12, rtol=0)
    m = b["response_mask"].bool()
    zero = m & (b["advantages"] == 0)
    assert metrics["toy/zero_adv_frac"] == pytest.approx(zero.sum().item() / m.sum().item())
    assert s_metrics["toy/zero_adv_frac"] == metrics["toy/zero_adv_frac"]
    # d loss / d log pi = -A / N on the kept tokens (token-mean), minus nothing on the dropped ones
    want = torch.where(m & ~zero, -b["advantages"] / m.sum(), torch.zeros((), dtype=D))
    torch.testing.assert_close(g_lp, want, atol=1e-15, rtol=0)
