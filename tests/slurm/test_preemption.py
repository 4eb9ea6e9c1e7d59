"""pipeline.preemption: SIGUSR1 or the sbatch script's file asks the trainer to checkpoint and requeue."""

import os
import signal

import pytest

from pipeline import preemption


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(preemption.FILE_ENV, raising=False)
    old = signal.getsignal(signal.SIGUSR1)
    preemption.clear()
    yield
    preemption.clear()
    signal.signal(signal.SIGUSR1, old)


def test_sigusr1_sets_the_request_flag():
    preemption.install()
    assert not preemption.requested()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert preemption.requested()
    preemption.clear()
    assert not preemption.requested()


def test_preempt_file_requests_without_a_signal(tmp_path, monkeypatch):
    f = tmp_path / "PREEMPT"
    monkeypatch.setenv(preemption.FILE_ENV, str(f))
    assert not preemption.requested()
    f.touch()
    assert preemption.requested()


def test_requeue_exit_code_matches_the_sbatch_script():
    from pathlib import Path

    script = (Path(__file__).resolve().parents[2] / "slurm" / "ray_job.sbatch").read_text()
    assert f"REQUEUE_EXIT_CODE:={preemption.REQUEUE_EXIT_CODE}}}" in script
