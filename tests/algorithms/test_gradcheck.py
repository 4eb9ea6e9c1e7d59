"""torch.autograd.gradcheck in float64 of apply_loss (w.r.t. log_prob and entropy) for every method and
composition of the contract list. The plan is fixed, as in training: selections are constants."""

import pytest
import torch

from pipeline.algorithms import apply_loss, prepare_loss
from tests.algorithms.common import CONTRACT_CONFIGS, make_batch


@pytest.mark.parametrize("name", sorted(CONTRACT_CONFIGS))
def test_gradcheck_every_method(name):
    cfg = CONTRACT_CONFIGS[name]
    b = make_batch(21, B=6, L=5)
    args = [b[k] for k in ("old_log_prob", "advantages", "response_mask")]
    plan = prepare_loss(cfg, b["log_prob"], *args, entropy=b["entropy"], ref_log_prob=b["ref_log_prob"],
                        sample_ids=b["sample_ids"])  # fmt: skip
    m = b["response_mask"].bool()
    lp0 = torch.where(m, b["log_prob"], -1.0)  # gradcheck perturbs every entry; padding must stay finite
    ent0 = torch.where(m, b["entropy"], 0.5)

    log_ratio = (lp0 - b["old_log_prob"]).detach()

    def f(lp, ent):
        old = args[0]
        if cfg.method == "cispo":
            # -sg(w) A log pi is a surrogate: its gradient deliberately ignores dw/dlog pi, so the finite
            # difference of its value only matches at a fixed ratio (old moves with log pi; apply_loss
            # detaches old_log_prob, so the analytical gradient is unchanged).
            old = torch.where(m, lp - log_ratio, old)
        return apply_loss(cfg, plan, lp, old, *args[1:], entropy=ent, ref_log_prob=b["ref_log_prob"])[0]

    lp, ent = lp0.clone().requires_grad_(True), ent0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (lp, ent), eps=1e-6, atol=1e-8)
    g = torch.autograd.grad(f(lp, ent), lp)[0]
    assert g.abs().sum() > 0
