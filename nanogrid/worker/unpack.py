"""Safe extraction of a function's code zip into a fresh directory.

``zipfile.extractall`` is not enough for untrusted uploads: it silently rewrites ``..`` and
absolute names instead of refusing them, trusts nothing about sizes, and would happily write
through a symlink planted earlier. Here every name is checked before anything is written,
each file is created with ``O_EXCL|O_NOFOLLOW`` relative to an already-opened directory fd
(so no path component is ever resolved through a symlink), and the unpacked bytes are
counted as they are produced, which is what stops a zip bomb whatever its headers claim.
Any problem with the package raises ``InvalidCodePackage`` with one line naming the entry
(``CorruptCodePackage`` when the archive cannot be read), after removing whatever was
already written; a full or failing work directory raises
``HostFault`` (the host's problem, not the package's).
"""

from __future__ import annotations

import errno
import lzma
import os
import re
import shutil
import stat
import struct
import zipfile
import zlib
from pathlib import Path

from nanogrid.common.config import LimitsConfig
from nanogrid.common.errors import CorruptCodePackage, InvalidCodePackage, host_fault

CHUNK = 64 * 1024
FILE_MODE = 0o644
EXEC_MODE = 0o755
DIR_MODE = 0o755

_OPEN_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DRIVE = re.compile(r"^[A-Za-z]:")
# What a damaged archive makes zipfile and its decompressors raise while reading.
_CORRUPT = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, struct.error, ValueError)
# Errors writing an entry that are the package's fault (name clashes, absurd names).
_NAME_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EINVAL}


def extract(zip_path: Path, dest: Path, limits: LimitsConfig) -> int:
    """Unpack ``zip_path`` into ``dest`` (created; must be absent or empty); return the file count.

    Raises InvalidCodePackage for anything wrong with the package; on any error ``dest``
    is left as it was found (removed if this call created it).
    """
    zip_path, dest = Path(zip_path), Path(dest)
    size = zip_path.stat().st_size
    if size > limits.max_zip_bytes:
        raise InvalidCodePackage(
            f"code zip is larger than {limits.max_zip_bytes} bytes ({size} bytes)"
        )
    try:
        created = _make_dest(dest)
    except OSError as exc:
        raise host_fault(exc, f"work dir {dest}") or exc from None
    try:
        return _extract(zip_path, dest, limits)
    except BaseException as exc:
        _cleanup(dest, created)
        if isinstance(exc, OSError) and (fault := host_fault(exc, f"work dir {dest}")):
            raise fault from None
        raise


def _make_dest(dest: Path) -> bool:
    try:
        dest.mkdir(mode=DIR_MODE, parents=True)
        return True
    except FileExistsError:
        if not dest.is_dir() or dest.is_symlink() or any(dest.iterdir()):
            raise FileExistsError(
                errno.EEXIST, "extraction target must be absent or an empty directory", str(dest)
            ) from None
        return False


def _cleanup(dest: Path, created: bool) -> None:
    if created:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _extract(zip_path: Path, dest: Path, limits: LimitsConfig) -> int:
    try:
        archive = zipfile.ZipFile(zip_path)
    except _CORRUPT as exc:
        raise CorruptCodePackage(f"code zip is corrupt or not a zip file: {_line(exc)}") from None
    with archive:
        entries = archive.infolist()
        if len(entries) > limits.max_files:
            raise InvalidCodePackage(
                f"code zip has {len(entries)} entries, more than the limit of {limits.max_files}"
            )
        # Every name is vetted before the first byte is written.
        plan = [(info, _safe_parts(info)) for info in entries]
        root_fd = os.open(dest, _OPEN_DIR)
        try:
            os.fchmod(root_fd, DIR_MODE)
            return _write_all(archive, plan, root_fd, limits.max_unpacked_bytes)
        finally:
            os.close(root_fd)


def _safe_parts(info: zipfile.ZipInfo) -> list[str]:
    """The entry's path components, or InvalidCodePackage if the entry must not be unpacked."""
    name = info.orig_filename
    if not name or "\x00" in name:
        raise InvalidCodePackage(f"code zip entry {name!r}: empty or contains a NUL byte")
    if "\\" in name:
        raise InvalidCodePackage(f"code zip entry {name!r}: backslash in the path")
    if name.startswith("/") or _DRIVE.match(name):
        raise InvalidCodePackage(f"code zip entry {name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidCodePackage(f"code zip entry {name!r}: '..' in the path")
    if info.flag_bits & 0x1:
        raise InvalidCodePackage(f"code zip entry {name!r}: encrypted")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise InvalidCodePackage(f"code zip entry {name!r}: symbolic link")
    kind = stat.S_IFMT(mode)
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise InvalidCodePackage(f"code zip entry {name!r}: not a regular file or directory")
    return parts


def _write_all(
    archive: zipfile.ZipFile,
    plan: list[tuple[zipfile.ZipInfo, list[str]]],
    root_fd: int,
    max_bytes: int,
) -> int:
    files = 0
    total = 0
    for info, parts in plan:
        if not parts:  # "./" and the like
            continue
        name = info.orig_filename
        try:
            if info.is_dir() or stat.S_ISDIR(info.external_attr >> 16):
                os.close(_open_dirs(root_fd, parts))
                continue
            parent_fd = _open_dirs(root_fd, parts[:-1])
            try:
                total = _write_file(archive, info, parent_fd, parts[-1], total, max_bytes)
            finally:
                if parent_fd != root_fd:
                    os.close(parent_fd)
            files += 1
        except _CORRUPT as exc:
            raise CorruptCodePackage(f"code zip entry {name!r}: corrupt: {_line(exc)}") from None
        except NotImplementedError as exc:
            raise InvalidCodePackage(f"code zip entry {name!r}: {_line(exc)}") from None
        except OSError as exc:
            if exc.errno in _NAME_ERRNOS:
                raise InvalidCodePackage(
                    f"code zip entry {name!r}: clashes with another entry or bad name "
                    f"({os.strerror(exc.errno)})"
                ) from None
            raise
    return files


def _open_dirs(root_fd: int, parts: list[str]) -> int:
    """Open (creating as needed) the directory ``parts`` below ``root_fd`` without following links.

    Returns ``root_fd`` itself for an empty path; any other fd is the caller's to close.
    """
    fd = root_fd
    try:
        for part in parts:
            try:
                os.mkdir(part, DIR_MODE, dir_fd=fd)
                fresh = True
            except FileExistsError:
                fresh = False
            child = os.open(part, _OPEN_DIR, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = child
            if fresh:
                os.fchmod(fd, DIR_MODE)  # the umask must not decide what the sandbox can read
    except BaseException:
        if fd != root_fd:
            os.close(fd)
        raise
    return fd


def _write_file(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    parent_fd: int,
    filename: str,
    total: int,
    max_bytes: int,
) -> int:
    """Stream one member into a new file, counting real output bytes; return the new total."""
    mode = EXEC_MODE if (info.external_attr >> 16) & 0o111 else FILE_MODE
    fd = os.open(filename, _OPEN_FILE, mode, dir_fd=parent_fd)
    with open(fd, "wb", closefd=True) as out, archive.open(info) as member:
        os.fchmod(fd, mode)
        while chunk := member.read(CHUNK):
            total += len(chunk)
            if total > max_bytes:
                raise InvalidCodePackage(
                    f"code zip entry {info.orig_filename!r}: unpacked contents exceed the limit "
                    f"of {max_bytes} bytes"
                )
            out.write(chunk)
    return total


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
