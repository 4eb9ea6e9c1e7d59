"""Rollout configuration, SGLang argument mapping and mismatch metrics: no server needed."""

import math

import pytest

from pipeline.rollout import RolloutConfig, RolloutConfigError, SamplingParams, logprob_mismatch
from pipeline.rollout.client import parse_output, sampling_payload
from pipeline.rollout.server import server_command, server_env
from pipeline.rollout.sglang_engine import SGLangEngine


def test_bad_configs_name_the_field():
    with pytest.raises(RolloutConfigError, match="model_path"):
        SGLangEngine(RolloutConfig())  # refused before any server starts
    with pytest.raises(RolloutConfigError, match="rollout.engine='vllm'"):
        RolloutConfig(engine="vllm").validate()
    with pytest.raises(RolloutConfigError, match="sync_method"):
        RolloutConfig(model_path="m", sync_method="nccl").validate()
    with pytest.raises(RolloutConfigError, match="mem_fraction_static"):
        RolloutConfig(model_path="m", mem_fraction_static=0).validate()
    assert RolloutConfig(model_path="m").backend == "gloo"
    assert RolloutConfig(model_path="m", device="cuda").backend == "nccl"


def test_cpu_servers_get_the_recipes_arguments_and_environment():
    cfg = RolloutConfig(model_path="m", tp_size=2, extra_args=["--foo"], pythonpath=["/shim"])
    cmd = server_command(cfg, "m", 1234)
    for flag in ["--device", "--attention-backend", "--sampling-backend", "--disable-cuda-graph", "--foo"]:
        assert flag in cmd
    assert cmd[cmd.index("--tp-size") + 1] == "2" and cmd[cmd.index("--port") + 1] == "1234"
    env = server_env(cfg)
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["SGLANG_CPU_OMP_THREADS_BIND"] == "0|1"
    assert env["PYTHONPATH"].startswith("/shim")
    gpu = server_command(RolloutConfig(model_path="m", device="cuda"), "m", 1)
    assert "--attention-backend" not in gpu


def test_sampling_params_map_to_sglang_and_outputs_to_samples():
    p = sampling_payload(
        SamplingParams(max_new_tokens=5, temperature=0.7, top_k=3, stop_token_ids=[9], seed=1), [2]
    )
    assert p["max_new_tokens"] == 5 and p["temperature"] == 0.7 and p["top_k"] == 3 and p["top_p"] == 1.0
    assert p["stop_token_ids"] == [2, 9] and p["sampling_seed"] == 1
    out = {
        "output_ids": [4, 2],
        "meta_info": {
            "output_token_logprobs": [[-0.5, 4, None], [-1.5, 2, None]],
            "finish_reason": {"type": "stop", "matched": 2},
            "weight_version": "7",
        },
    }
    s = parse_output([1, 3], out, default_version=0)
    assert (s.response_ids, s.logprobs, s.finish_reason, s.weight_version) == (
        [4, 2],
        [-0.5, -1.5],
        "stop",
        7,
    )
    out["meta_info"]["output_token_logprobs"] = [[-0.5, 4, None]]
    with pytest.raises(RuntimeError, match="log-probs"):
        parse_output([1], out, 0)


def test_mismatch_metrics():
    m = logprob_mismatch([[-1.0, -2.0], [-0.5]], [[-1.0, -2.5], [-0.25]])
    assert m["mismatch/logprob_max_abs"] == 0.5 and math.isclose(m["mismatch/logprob_mean_abs"], 0.25)
    assert m["mismatch/kl_k3"] > 0
    assert logprob_mismatch([[-1.0]], [[-1.0]])["mismatch/kl_k3"] == 0.0


def test_gpu_engines_see_only_their_gpus_and_release_memory_when_colocated():
    cfg = RolloutConfig(
        model_path="m", device="cuda", tp_size=2, python="/env/bin/python", sync_method="tensor"
    )
    cmd = server_command(cfg, "m", 30001, host="10.0.0.7", gpus=[4, 5], memory_saver=True)
    assert cmd[0] == "/env/bin/python" and cmd[cmd.index("--host") + 1] == "10.0.0.7"
    assert cmd[cmd.index("--base-gpu-id") + 1] == "0" and "--enable-memory-saver" in cmd
    assert "--device" not in cmd and "--disable-cuda-graph" not in cmd
    env = server_env(cfg, [4, 5])
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5" and "SGLANG_USE_CPU_ENGINE" not in env
    plain = server_command(RolloutConfig(model_path="m"), "m", 1)
    assert "--base-gpu-id" not in plain and "--enable-memory-saver" not in plain
    assert plain[plain.index("--host") + 1] == "127.0.0.1"  # "" outside Ray: loopback


def test_servers_inherit_the_whole_environment_of_their_parent(monkeypatch):
    monkeypatch.setenv("PIPELINE_JOB_ID", "job-42")  # what a job reaper marks the job's processes with
    env = server_env(RolloutConfig(model_path="m", env={"EXTRA": "1"}), [0])
    assert env["PIPELINE_JOB_ID"] == "job-42" and env["EXTRA"] == "1" and env["PATH"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), r"rollout.python: set the interpreter of the SGLang environment"),
        (dict(python="p"), r"sync_method=distributed with rollout.colocate=true on GPUs.*NCCL refuses"),
        (dict(python="p", colocate=False, sync_method="tensor"), r"CUDA IPC handles only reach"),
        (dict(python="p", sync_method="disk"), r"sync_method=disk on a cluster needs rollout.sync_dir"),
        (dict(python="p", device="gpu"), r"rollout.device='gpu'"),
    ],
)
def test_gpu_configs_that_cannot_work_are_refused_at_load(kwargs, match):
    with pytest.raises(RolloutConfigError, match=match):
        RolloutConfig(**{"model_path": "m", "engine": "sglang", "device": "cuda", **kwargs}).validate()
    ok = {"model_path": "m", "engine": "sglang", "device": "cuda", "python": "p"}
    RolloutConfig(**ok, sync_method="tensor").validate()
    RolloutConfig(**ok, colocate=False).validate()
    RolloutConfig(**ok, sync_method="disk", sync_dir="/shared/sync").validate()
