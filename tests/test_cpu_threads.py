"""caption_model.cpu.threads: inference threads follow the CPUs a container may use, not the host's core count."""

from __future__ import annotations

import os

import pytest
import torch

from caption_model.cpu.threads import available_cpus, cpu_quota, set_inference_threads


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota(tmp_path):
    write(tmp_path / "cpu.max", "150000 100000\n")
    assert cpu_quota(tmp_path) == pytest.approx(1.5)
    write(tmp_path / "cpu.max", "max 100000\n")
    assert cpu_quota(tmp_path) is None


@pytest.mark.parametrize("folder", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_quota(tmp_path, folder):
    write(tmp_path / folder / "cpu.cfs_quota_us", "50000\n")
    write(tmp_path / folder / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(tmp_path) == pytest.approx(0.5)
    write(tmp_path / folder / "cpu.cfs_quota_us", "-1\n")
    assert cpu_quota(tmp_path) is None


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert cpu_quota(tmp_path) is None
    write(tmp_path / "cpu.max", "garbage")
    assert cpu_quota(tmp_path) is None


def test_available_cpus_is_the_affinity_capped_by_the_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == affinity  # no quota
    write(tmp_path / "cpu.max", "50000 100000")  # half a CPU still gets one thread
    assert available_cpus(tmp_path) == 1
    write(tmp_path / "cpu.max", f"{(affinity + 8) * 100000} 100000")  # a quota above the affinity changes nothing
    assert available_cpus(tmp_path) == affinity


def test_set_inference_threads():
    before = torch.get_num_threads()
    try:
        assert set_inference_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_inference_threads() == available_cpus() == torch.get_num_threads()
        with pytest.raises(ValueError, match="at least 1, got 0"):
            set_inference_threads(0)
    finally:
        torch.set_num_threads(before)
