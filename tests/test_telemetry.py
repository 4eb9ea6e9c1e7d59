"""Entropy dynamics telemetry: the R = -a exp(H) + b fit, the first-order entropy change, covariance."""

import math

import pytest
import torch

from pipeline.ops import vocab_parallel_logprob_entropy
from pipeline.telemetry import (
    RunningCorrelation,
    covariance_stats,
    entropy_groups,
    fit_entropy_law,
    predicted_entropy_change,
    token_quantiles,
)


def test_fit_recovers_a_and_b_from_noisy_points_of_the_law():
    g = torch.Generator().manual_seed(0)
    a, b = 0.35, 0.9
    h = torch.linspace(0.05, 1.5, 40, dtype=torch.float64)
    r = -a * h.exp() + b + 0.01 * torch.randn(40, generator=g, dtype=torch.float64)
    fit = fit_entropy_law(h.tolist(), r.tolist())
    assert fit["a"] == pytest.approx(a, abs=0.01) and fit["b"] == pytest.approx(b, abs=0.015)
    assert fit["ceiling"] == pytest.approx(b - a, abs=0.02) and fit["r2"] > 0.99 and fit["n"] == 40


def test_fit_is_exact_on_exact_points_and_refuses_degenerate_input():
    h = [0.1, 0.4, 0.9, 1.3]
    fit = fit_entropy_law(h, [-2.0 * math.exp(x) + 3.0 for x in h])
    assert fit["a"] == pytest.approx(2.0, abs=1e-12) and fit["b"] == pytest.approx(3.0, abs=1e-12)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit_entropy_law([0.1, 0.2], [0.5, 0.4]) is None  # fewer than 3 points
    assert fit_entropy_law([0.3, 0.3, 0.3], [0.1, 0.2, 0.3]) is None  # nothing to fit
    assert fit_entropy_law([0.1, float("nan"), 0.5, 0.9], [0.5, 0.4, 0.3, 0.2])["n"] == 3


@pytest.mark.parametrize("eta", [1.0, 0.1, 0.01])
def test_tabular_softmax_pg_step_changes_entropy_as_predicted(eta):
    """Logits are the parameters (one state per token): the prediction is the first-order change."""
    g = torch.Generator().manual_seed(1)
    n, v = 64, 50
    z = (2.0 * torch.randn(n, v, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.ones(n, dtype=torch.bool)
    out = vocab_parallel_logprob_entropy(z, y, influence=True)
    (-(adv * out.logprob).mean()).backward()  # token-mean PG loss
    with torch.no_grad():
        h_after = vocab_parallel_logprob_entropy(z - eta * z.grad, y).entropy
    measured = float(h_after.mean() - out.entropy.detach().mean())
    predicted = predicted_entropy_change(adv, out.influence, mask, eta)
    assert abs(measured) > 1e-7
    assert predicted == pytest.approx(measured, rel=0.05 * eta)  # measured: 3e-2, 3e-3, 3e-4: O(eta^2)


def test_running_correlation_is_pearsons_r_and_survives_a_checkpoint():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, generator=g, dtype=torch.float64)
    y = 0.5 * x + 0.8 * torch.randn(50, generator=g, dtype=torch.float64)
    c = RunningCorrelation()
    for xi, yi in zip(x[:20].tolist(), y[:20].tolist(), strict=True):
        c.add(xi, yi)
    d = RunningCorrelation()
    d.load_state_dict(c.state_dict())
    for xi, yi in zip(x[20:].tolist(), y[20:].tolist(), strict=True):
        d.add(xi, yi)
    d.add(float("nan"), 1.0)  # ignored
    assert d.n == 50
    assert d.value() == pytest.approx(float(torch.corrcoef(torch.stack([x, y]))[0, 1]), abs=1e-12)
    assert math.isnan(RunningCorrelation().value())


def test_covariance_stats_on_the_worked_example():
    """Spec §3.2(f): A = [1,1,1 | -1,-1,-1], log p = [-.1,-2,-.5 | -.2,-3,-1] -> Cov sums to 1.6."""
    lp = torch.tensor([[-0.1, -2.0, -0.5], [-0.2, -3.0, -1.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    s = covariance_stats(lp, adv, torch.ones(2, 3))
    assert s["mean"] == pytest.approx(1.6 / 6, abs=1e-6) and s["max"] == pytest.approx(1.8667, abs=1e-4)
    assert s["p90"] <= s["p99"] <= s["p99.9"] <= s["max"]


def test_entropy_groups_pick_the_top_fifth_of_valid_tokens():
    h = torch.tensor([[0.1, 0.9, 0.2, 0.8, 5.0], [0.3, 0.4, 0.5, 0.6, 0.7]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    high = entropy_groups(h, mask)
    assert high.tolist() == [[False, True, False, True, False], [False, False, False, False, False]]


def test_token_quantiles_are_exact_above_torch_quantiles_limit_of_2_to_the_24():
    """A 2048 x 8192-token step has 2^24 response tokens: the entropy quantiles must still work.

    The valid tokens hold a permutation of 0 .. n-1, so the q-quantile is q (n - 1) exactly;
    padding holds huge values that must not count. About 0.5 GB and a few seconds."""
    n_row = 2**23 + 3
    mask = torch.ones(2, n_row, dtype=torch.bool)
    mask[1, -1] = False
    n = int(mask.sum())
    assert n > 2**24
    x = torch.full((2, n_row), 1e30, dtype=torch.float64)
    x[mask] = torch.randperm(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(x[mask], 0.5)  # the cliff this guards against
    got = token_quantiles(x, mask)
    assert got == {"mean": (n - 1) / 2, "p10": 0.1 * (n - 1), "p50": 0.5 * (n - 1), "p90": 0.9 * (n - 1)}
