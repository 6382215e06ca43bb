"""The cgroup peak readers' use of their files (the real kernel files: component tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nanogrid.runners.memory import CgroupV1Memory, CgroupV2Memory


def _cgroup_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def _opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: str, flags: int, *args: int) -> int:
        opened.append(os.path.basename(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", counting_open)
    return opened


def test_v2_reads_the_peak_through_the_descriptor_it_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux resets memory.peak for reads through the written descriptor only."""
    memory = CgroupV2Memory(
        _cgroup_dir(tmp_path, {"memory.peak": "9", "memory.events": "oom 0\noom_kill 2\n"})
    )
    opened = _opens(monkeypatch)
    for _ in range(3):  # three runs
        assert memory.oom_kills() == 2
        memory.reset_peak()
        assert memory.peak_bytes() == 0  # what the reset wrote, read back through its fd
    assert sorted(opened) == ["memory.events", "memory.peak"]  # each opened once
    memory.close()
    assert memory.peak_bytes() is None  # closed: nothing kept open to read from


def test_v2_without_a_resettable_peak_reports_none(tmp_path: Path) -> None:
    memory = CgroupV2Memory(_cgroup_dir(tmp_path, {"memory.events": "oom_kill 0\n"}))
    memory.reset_peak()
    assert memory.peak_bytes() is None


def test_v1_keeps_its_files_open_until_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = CgroupV1Memory(_cgroup_dir(tmp_path, {
        "memory.max_usage_in_bytes": "9",
        "memory.oom_control": "oom_kill_disable 0\noom_kill 1\n",
    }))
    opened = _opens(monkeypatch)
    for _ in range(3):
        assert memory.oom_kills() == 1
        assert memory.peak_bytes() == 9
    memory.reset_peak()
    assert memory.peak_bytes() == 0  # (a plain file here: the "0" the reset wrote)
    assert sorted(opened) == ["memory.max_usage_in_bytes", "memory.oom_control"]
    before = len(os.listdir("/proc/self/fd"))
    memory.close()
    assert len(os.listdir("/proc/self/fd")) == before - 2
