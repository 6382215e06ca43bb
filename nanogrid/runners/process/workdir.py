"""The process runner's work_dir: checked before any worker starts, its sandbox directories
made with exact modes, and those of gone workers removed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from nanogrid.common.errors import ConfigError

from ..cgroups import owner_gone


def make_dir(path: Path, mode: int) -> None:
    """mkdir with exactly ``mode`` (missing parents: traversable 0711): the agent's umask
    (systemd's UMask=0027) must not decide what a sandbox user can reach."""
    try:
        os.mkdir(path, 0o700)  # a sandbox's own: its parent is there (4 per sandbox)
    except FileExistsError:
        pass
    except FileNotFoundError:
        for missing in reversed([p for p in [path, *path.parents] if not p.exists()]):
            missing.mkdir(exist_ok=True)
            os.chmod(missing, 0o711)
    os.chmod(path, mode)


def remove_stale_dirs(work_dir: Path) -> None:
    """Remove sandbox directories of workers that are gone."""
    if work_dir.is_dir():
        for child in work_dir.iterdir():
            if owner_gone(child.name):
                shutil.rmtree(child, ignore_errors=True)


def check_traversable(directory: Path) -> None:
    """Sandbox users (not root, not the owner) must be able to pass through to their dirs."""
    for part in [directory, *directory.parents]:
        if part.exists() and not part.stat().st_mode & 0o001:
            raise ConfigError(
                f"paths.work_dir: sandbox users cannot reach {directory} "
                f"({part} needs o+x, or pick a work_dir under a traversable directory)"
            )


def check_work_dir(work_dir: Path, *, as_root: bool) -> None:
    """Refuse a work_dir the workers could never make their sandboxes in (ConfigError)."""
    nearest = next(p for p in [work_dir, *work_dir.parents] if p.exists())
    if not nearest.is_dir():
        raise ConfigError(f"paths.work_dir: {nearest} is not a directory")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(f"paths.work_dir: {nearest} is not writable by the agent")
    if as_root:
        check_traversable(work_dir)
