"""The converters: HF -> torch_dist -> (TP1/TP2/PP2 model) logits equal HF's and exports bit-exact;
torch_dist -> HF bit-exact and loadable by transformers; bad input fails with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conversion.models import MODELS, make_models
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = [dict(tp=1), dict(tp=2), dict(pp=2)]
IDS = torch.tensor([[3, 17, 249, 5, 88, 120, 7, 200, 64, 1, 33, 248]])


def _convert_all(dirs: dict, root: Path) -> dict:
    """HF -> torch_dist -> HF for every model, in one subprocess (one import of megatron)."""
    code = (
        "import json, sys; from pathlib import Path; from pipeline import conversion as cv, hf_io\n"
        "from pipeline.actor.export import megatron_to_hf_stream\n"
        "dirs, root = json.loads(sys.argv[1]), Path(sys.argv[2])\n"
        "for name, hf_dir in dirs.items():\n"
        "    ckpt, back = root / (name + '.ckpt'), root / (name + '.hf')\n"
        "    cv.hf_to_torch_dist(hf_dir, ckpt, tp=2, progress=False)\n"
        "    cfg = hf_io.read_config(hf_dir); back.mkdir()\n"
        "    hf_io.save_hf_shards(megatron_to_hf_stream(cv.read_torch_dist(ckpt, cfg, progress=False), cfg, te=True),\n"
        "                      back, layout=cv.hf_layout(cfg), dtype=cv.stored_dtype(ckpt), shard_bytes=100_000)\n"
        "    hf_io.copy_side_files(ckpt / 'hf', back)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(dirs), str(root)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return {n: (str(root / f"{n}.ckpt"), str(root / f"{n}.hf")) for n in dirs}


def _logits(chunks, hf_config):
    """Full-vocab logits of IDS through this rank's chunks (TP pieces gathered, PP by send/recv)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    model = chunks[0].eval()
    pos = torch.arange(IDS.shape[1])[None]
    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    group = ps.get_pipeline_model_parallel_group()
    with torch.no_grad():
        if pp > 1 and stage > 0:
            hidden = torch.empty(IDS.shape[1], 1, hf_config["hidden_size"])
            dist.recv(hidden, dist.get_global_rank(group, stage - 1), group=group)
            model.set_input_tensor(hidden)
        out = model(IDS, pos, None)
        if pp > 1 and stage < pp - 1:
            dist.send(out.contiguous(), dist.get_global_rank(group, stage + 1), group=group)
            return None
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        pieces = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(pieces, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(pieces, dim=-1)
    return out[..., : hf_config["vocab_size"]]


def _load_worker(rank, world_size, ckpts):
    from megatron.core import parallel_state as ps

    import megatron_patches
    from pipeline.actor.actor import initialize_parallel
    from pipeline.actor.config import ActorConfig
    from pipeline.actor.export import export_hf_weights
    from pipeline.actor.model import build_model
    from pipeline.conversion import load_model_checkpoint
    from pipeline.hf_io import read_config

    megatron_patches.apply(megatron_patches.CPU_PATCHES)
    out = {}
    for name, ckpt in ckpts.items():
        hf_config = read_config(Path(ckpt) / "hf")
        for layout in LAYOUTS:
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            cfg = ActorConfig(**layout)
            initialize_parallel(cfg, hf_config)
            chunks = build_model(hf_config, cfg)
            load_model_checkpoint(chunks, ckpt)
            key = (name, tuple(layout.items()))
            out[key + ("logits",)] = _logits(chunks, hf_config)
            out[key + ("export",)] = dict(export_hf_weights(chunks, hf_config))
    ps.destroy_model_parallel()
    return out


@pytest.mark.multiproc
@pytest.mark.slow
def test_converted_checkpoint_loads_at_tp1_tp2_pp2_with_hf_logits_and_converts_back_bit_exact(tmp_path):
    import transformers

    from pipeline.hf_io import HFWeights

    dirs = make_models(tmp_path)
    paths = _convert_all(dirs, tmp_path)
    results = run_distributed(_load_worker, 2, {n: c for n, (c, _) in paths.items()})
    for name, hf_dir in dirs.items():
        hf = HFWeights(hf_dir)
        with torch.no_grad():
            ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(
                input_ids=IDS
            ).logits
        for layout in LAYOUTS:
            key = (name, tuple(layout.items()))
            last = 1 if layout.get("pp") == 2 else 0
            diff = (results[last][key + ("logits",)] - ref).abs().max().item()
            print(f"{name} {layout}: max|logit diff| = {diff:.2e}")
            assert diff < 1e-5, (name, layout, diff)
            exported = results[0][key + ("export",)]
            assert exported.keys() == set(hf) and all(torch.equal(exported[k], hf[k]) for k in hf), (
                name,
                layout,
            )
        # the offline export: several shards + index, bit-exact, loadable by transformers
        back_dir = Path(paths[name][1])
        back = HFWeights(back_dir)
        assert (back_dir / "model.safetensors.index.json").exists()
        assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf), name
        assert (back_dir / "config.json").exists()
        with torch.no_grad():
            again = transformers.AutoModelForCausalLM.from_pretrained(back_dir, dtype=torch.float32)(
                input_ids=IDS
            ).logits
        assert torch.equal(again, ref), name
    assert {MODELS[n][0] for n in dirs} == {"llama", "mistral", "qwen2", "qwen3"}


# ---------------------------------------------------------------------- bad input


def _cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_bad_inputs_fail_with_a_clear_message(tmp_path):
    from safetensors.torch import save_file

    from pipeline import conversion as cv
    from pipeline.actor.hf_mapping.family import WeightsMismatch
    from pipeline.hf_io import HFWeights

    d = make_models(tmp_path, ["qwen2_tied_gqa2"])["qwen2_tied_gqa2"]
    # unknown architecture, through the CLI: the supported ones are listed, exit status 2
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    r = _cli("tools/convert_hf_to_megatron.py", "--hf-dir", str(odd), "--out-dir", str(tmp_path / "o"))
    assert (
        r.returncode == 2 and "gpt_neox" in r.stderr and "['llama', 'mistral', 'qwen2', 'qwen3']" in r.stderr
    ), r.stderr
    # an output directory that exists: refused without --force
    with pytest.raises(cv.ConversionError, match="--force"):
        cv.check_out_dir(d, force=False, inputs={})
    # sharded checkpoint with a missing shard, and one with a partial shard
    hf = dict(HFWeights(d).items())
    names = sorted(hf)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({n: hf[n] for n in names[:10]}, str(sharded / "a.safetensors"))
    save_file({n: hf[n] for n in names[10:15]}, str(sharded / "b.safetensors"))  # partial: 15.. missing
    wm = {n: "a.safetensors" for n in names[:10]} | {n: "b.safetensors" for n in names[10:]}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(cv.ConversionError, match=r"b\.safetensors lacks .* partial shard"):
        HFWeights(sharded)
    (sharded / "b.safetensors").unlink()
    with pytest.raises(cv.ConversionError, match=r"\['b\.safetensors'\] .* missing"):
        HFWeights(sharded)
    # config and weights that disagree: the tensor and both shapes
    cfg = json.loads((Path(d) / "config.json").read_text())
    with pytest.raises(
        WeightsMismatch,
        match=r"mlp\.gate_proj\.weight: config\.json implies shape \(80, 64\), the weights have \(96, 64\)",
    ):
        cv.check_hf(HFWeights(d), dict(cfg, intermediate_size=80))


# ---------------------------------------------------------------------- nothing lost (issue 16 items 1, 12)


def test_an_output_that_is_contains_or_is_inside_an_input_is_refused(tmp_path):
    from pipeline import conversion as cv

    inp = tmp_path / "in" / "model"
    inp.mkdir(parents=True)
    (tmp_path / "link").symlink_to(inp)
    for out, how in [(inp, "is"), (tmp_path / "link", "is"), (tmp_path / "in", "contains"), (tmp_path, "contains"),
                     (inp / "megatron", "is inside")]:  # fmt: skip
        with pytest.raises(cv.ConversionError, match=f"--out-dir {out} {how} the input --hf-dir {inp};"):
            cv.check_out_dir(out, force=True, inputs={"--hf-dir": inp})
    assert cv.check_out_dir(tmp_path / "in" / "other", force=False, inputs={"--hf-dir": inp})


def test_staged_output_replaces_the_old_one_only_on_success(tmp_path):
    from pipeline import conversion as cv

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (tmp_path / ".out.partial-999999999").mkdir()  # left by a killed run (no such pid)
    for exc in (RuntimeError("boom"), KeyboardInterrupt(), SystemExit(143)):
        with pytest.raises(type(exc)), cv.staged_out_dir(out, True, {}) as tmp:
            (tmp / "half.safetensors").write_text("partial")
            raise exc
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # stale and partial siblings gone
        assert [p.name for p in out.iterdir()] == ["old.txt"]
    with cv.staged_out_dir(out, True, {}) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "out"
    ]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Qwen2 in HF form and as a torch_dist checkpoint (made by the CLI)."""
    root = tmp_path_factory.mktemp("conv")
    hf = Path(make_models(root, ["qwen2_tied_gqa2"])["qwen2_tied_gqa2"])
    r = _cli(
        "tools/convert_hf_to_megatron.py",
        "--hf-dir",
        str(hf),
        "--out-dir",
        str(root / "ckpt"),
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    return hf, root / "ckpt"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _error(r) -> str:
    """The tool's one error line: the last line of stderr, with no traceback before it."""
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip().splitlines()[-1]


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_converters_refuse_to_write_over_their_input_and_leave_it_intact(converted, tmp_path):
    hf, ckpt = converted
    hf, ckpt = _copy(hf, tmp_path / "hf"), _copy(ckpt, tmp_path / "ckpt")
    before = {p: p.read_bytes() for p in [*hf.iterdir(), *ckpt.rglob("*")] if p.is_file()}
    runs = [
        ("tools/convert_hf_to_megatron.py", "--hf-dir", str(hf), "--out-dir", str(hf), "--force"),
        ("tools/convert_hf_to_megatron.py", "--hf-dir", str(hf), "--out-dir", str(tmp_path), "--force"),
        ("tools/convert_megatron_to_hf.py", "--ckpt-dir", str(ckpt), "--out-dir", str(ckpt), "--force"),
        (
            "tools/convert_megatron_to_hf.py",
            "--ckpt-dir",
            str(ckpt),
            "--out-dir",
            str(ckpt / "hf"),
            "--force",
        ),
    ]
    for args in runs:
        r = _cli(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "the input --" in r.stderr, r.stderr
    assert {p: p.read_bytes() for p in before} == before


def test_a_truncated_distcp_is_named_and_leaves_no_partial_output(converted, tmp_path):
    _, ckpt = converted
    ckpt = _copy(ckpt, tmp_path / "ckpt")
    biggest = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    size = biggest.stat().st_size
    biggest.write_bytes(biggest.read_bytes()[: size // 2])
    out = tmp_path / "out"
    r = _cli(
        "tools/convert_megatron_to_hf.py", "--ckpt-dir", str(ckpt), "--out-dir", str(out), "--no-progress"
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {biggest} has {size // 2} of its {size} bytes: the checkpoint is incomplete"
    ], r.stderr  # found before megatron is imported: nothing else on stderr
    assert not out.exists() and _siblings(out) == []


def test_a_failure_mid_conversion_leaves_the_old_output_and_no_partial_one(converted, tmp_path):
    """config.json says 3 layers, the checkpoint holds 2: the embedding is already written to the
    (temporary) safetensors when the first layer fails to read; --force's old output survives."""
    hf, ckpt = converted
    side = _copy(hf, tmp_path / "side")
    cfg = json.loads((side / "config.json").read_text())
    (side / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    args = ["--ckpt-dir", str(ckpt), "--out-dir", str(out), "--force", "--no-progress"]
    r = _cli("tools/convert_megatron_to_hf.py", *args, "--hf-config-dir", str(side))
    line = _error(r)
    assert (
        r.returncode == 2
        and line.startswith("error: decoder.layers.")
        and line.endswith(": stored for 2 layers, config.json says 3")
    ), r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and _siblings(out) == []
    r = _cli("tools/convert_megatron_to_hf.py", *args)
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists() and _siblings(out) == []


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_a_corrupt_hf_input_is_one_line_naming_the_file(converted, tmp_path, damage):
    hf, _ = converted
    hf = _copy(hf, tmp_path / "hf")
    target = hf / ("config.json" if damage == "config" else "model.safetensors")
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    out = tmp_path / "out"
    r = _cli("tools/convert_hf_to_megatron.py", "--hf-dir", str(hf), "--out-dir", str(out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {target}"), (
        r.stderr
    )
    assert not out.exists() and _siblings(out) == []
