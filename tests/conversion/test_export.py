"""The live-actor export generator yields exactly the HF state dict at TP2 and at PP2."""

from __future__ import annotations

import pytest
import torch

from tests.conversion.models import MODELS, make_models
from tests.distributed import run_distributed

LAYOUTS = [dict(tp=2), dict(pp=2)]


def build_loaded(layout: dict, hf_dir: str):
    """Parallel state for `layout` and model chunks holding `hf_dir`'s weights."""
    from megatron.core import parallel_state as ps

    import megatron_patches
    from pipeline.actor.actor import initialize_parallel
    from pipeline.actor.config import ActorConfig
    from pipeline.actor.model import build_model
    from pipeline.actor.weights import load_hf_weights
    from pipeline.hf_io import read_config

    megatron_patches.apply(megatron_patches.CPU_PATCHES)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    cfg = ActorConfig(**layout)
    hf_config = read_config(hf_dir)
    initialize_parallel(cfg, hf_config)
    chunks = build_model(hf_config, cfg)
    load_hf_weights(chunks, hf_dir, hf_config)
    return chunks, hf_config


def _export_worker(rank, world_size, dirs):
    from megatron.core import parallel_state as ps

    from pipeline.actor.export import export_hf_buckets, export_hf_weights

    out = {}
    for name, hf_dir in dirs.items():
        for layout in LAYOUTS:
            chunks, hf_config = build_loaded(layout, hf_dir)
            key = (name, tuple(layout.items()))
            out[key] = list(export_hf_weights(chunks, hf_config))
            buckets = list(export_hf_buckets(chunks, hf_config, bucket_bytes=20_000))
            out[key + ("buckets",)] = [[n for n, _ in b] for b in buckets]
            out[key + ("bucket_bytes",)] = [sum(t.numel() * t.element_size() for _, t in b) for b in buckets]
    ps.destroy_model_parallel()
    return out


@pytest.mark.multiproc
@pytest.mark.slow
def test_export_generator_yields_exactly_the_hf_state_dict_at_tp2_and_pp2(tmp_path):
    from pipeline.hf_io import HFWeights

    dirs = make_models(tmp_path)
    results = run_distributed(_export_worker, 2, dirs)
    for name, hf_dir in dirs.items():
        hf = HFWeights(hf_dir)
        for layout in LAYOUTS:
            key = (name, tuple(layout.items()))
            assert results[1][key] == [], "only global rank 0 yields"
            names = [n for n, _ in results[0][key]]
            assert len(names) == len(set(names)) and set(names) == set(hf), (name, layout)
            for n, t in results[0][key]:
                assert t.dtype == hf[n].dtype and torch.equal(t, hf[n]), (name, layout, n)
            flat = [n for b in results[0][key + ("buckets",)] for n in b]
            assert flat == names, "buckets keep the generator's order and drop nothing"
            sizes = results[0][key + ("bucket_bytes",)]
            assert len(sizes) > 1 and all(
                s <= 20_000 or len(b) == 1 for s, b in zip(sizes, results[0][key + ("buckets",)])
            )
        print(f"{name} ({MODELS[name][0]}): {len(hf)} tensors exported bit-exactly at {LAYOUTS}")
