"""Safe zip extraction: what a hostile or broken code package must not be able to do."""

from __future__ import annotations

import os
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import pytest

from nanogrid.common.config import LimitsConfig
from nanogrid.common.errors import InvalidCodePackage
from nanogrid.worker import unpack

MiB = 2**20
LIMITS = LimitsConfig(max_zip_bytes=4 * MiB, max_unpacked_bytes=1 * MiB, max_files=10)


def make_zip(path: Path, entries: list[tuple[str, bytes, int]]) -> Path:
    """Write a zip of (name, data, unix mode) entries exactly as given, with no name cleaning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are deliberate in some tests
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data, mode in entries:
                info = zipfile.ZipInfo(name)
                info.create_system = 3
                info.external_attr = mode << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
    return path


def reg(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[str, bytes, int]:
    return (name, data, stat.S_IFREG | mode)


def patch_claimed_size(path: Path, claimed: int) -> None:
    """Make the local header and central directory of a one-member zip lie about its size."""
    raw = bytearray(path.read_bytes())
    assert raw.count(b"PK\x03\x04") == 1 and raw.count(b"PK\x01\x02") == 1
    local = raw.index(b"PK\x03\x04")
    central = raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, local + 22, claimed)
    struct.pack_into("<I", raw, central + 24, claimed)
    path.write_bytes(bytes(raw))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_nested_tree_is_extracted_with_contents(tmp_path: Path) -> None:
    zp = make_zip(
        tmp_path / "code.zip",
        [
            reg("main.py", b"print('hi')\n"),
            ("lib/", b"", stat.S_IFDIR | 0o755),
            reg("lib/pkg/__init__.py", b""),
            reg("lib/pkg/util.py", b"X = 1\n"),
            ("empty/", b"", stat.S_IFDIR | 0o700),
            reg("./data/table.csv", b"a,b\n1,2\n"),
        ],
    )
    dest = tmp_path / "out"
    assert unpack.extract(zp, dest, LIMITS) == 4
    assert (dest / "main.py").read_bytes() == b"print('hi')\n"
    assert (dest / "lib/pkg/util.py").read_bytes() == b"X = 1\n"
    assert (dest / "lib/pkg/__init__.py").read_bytes() == b""
    assert (dest / "data/table.csv").read_bytes() == b"a,b\n1,2\n"
    assert (dest / "empty").is_dir()


def test_modes_ignore_zip_and_umask(tmp_path: Path) -> None:
    zp = make_zip(
        tmp_path / "code.zip",
        [
            reg("main.py", mode=0o600),
            reg("bin/run.sh", b"#!/bin/sh\n", mode=0o700),
            reg("setuid", mode=0o4777),
            ("secret/", b"", stat.S_IFDIR | 0o700),
        ],
    )
    dest = tmp_path / "out"
    old = os.umask(0o077)
    try:
        unpack.extract(zp, dest, LIMITS)
    finally:
        os.umask(old)
    assert mode_of(dest) == 0o755
    assert mode_of(dest / "main.py") == 0o644
    assert mode_of(dest / "bin") == 0o755
    assert mode_of(dest / "bin/run.sh") == 0o755
    assert mode_of(dest / "setuid") == 0o755  # executable yes, setuid never
    assert mode_of(dest / "secret") == 0o755
    assert (dest / "main.py").stat().st_uid == os.getuid()


def test_zip_without_unix_modes_gives_plain_files(tmp_path: Path) -> None:
    zp = tmp_path / "code.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        info = zipfile.ZipInfo("main.py")
        info.create_system = 0  # MS-DOS: no unix mode bits at all
        info.external_attr = 0x20
        zf.writestr(info, b"pass\n")
    unpack.extract(zp, tmp_path / "out", LIMITS)
    assert mode_of(tmp_path / "out/main.py") == 0o644


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../evil.py", "'..'"),
        ("lib/../../evil.py", "'..'"),
        ("/etc/cron.d/evil", "absolute"),
        ("C:/Windows/evil.py", "absolute"),
        ("c:evil.py", "absolute"),
        ("..\\evil.py", "backslash"),
        ("lib\\evil.py", "backslash"),
    ],
)
def test_escaping_names_are_refused_before_anything_is_written(
    tmp_path: Path, name: str, why: str
) -> None:
    zp = make_zip(tmp_path / "code.zip", [reg("main.py"), reg(name)])
    dest = tmp_path / "work" / "out"
    with pytest.raises(InvalidCodePackage, match=why) as err:
        unpack.extract(zp, dest, LIMITS)
    assert repr(name) in str(err.value)
    assert "\n" not in str(err.value)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["code.zip", "work"]


def test_symlink_entry_is_refused(tmp_path: Path) -> None:
    zp = make_zip(
        tmp_path / "code.zip", [reg("main.py"), ("passwd", b"/etc/passwd", stat.S_IFLNK | 0o777)]
    )
    with pytest.raises(InvalidCodePackage, match=r"'passwd': symbolic link"):
        unpack.extract(zp, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_device_entry_is_refused(tmp_path: Path) -> None:
    zp = make_zip(tmp_path / "code.zip", [("fifo", b"", stat.S_IFIFO | 0o644)])
    with pytest.raises(InvalidCodePackage, match="not a regular file"):
        unpack.extract(zp, tmp_path / "out", LIMITS)


def test_too_many_entries(tmp_path: Path) -> None:
    zp = make_zip(tmp_path / "code.zip", [reg(f"f{i}.py") for i in range(11)])
    with pytest.raises(InvalidCodePackage, match="11 entries, more than the limit of 10"):
        unpack.extract(zp, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_exactly_max_files_is_fine(tmp_path: Path) -> None:
    zp = make_zip(tmp_path / "code.zip", [reg(f"f{i}.py") for i in range(10)])
    assert unpack.extract(zp, tmp_path / "out", LIMITS) == 10


def test_zip_larger_than_limit_is_refused_unopened(tmp_path: Path) -> None:
    zp = make_zip(tmp_path / "code.zip", [reg("main.py", os.urandom(4096))])
    limits = LimitsConfig(max_zip_bytes=1024)
    with pytest.raises(InvalidCodePackage, match="larger than 1024 bytes"):
        unpack.extract(zp, tmp_path / "out", limits)
    assert not (tmp_path / "out").exists()


class CountingReads:
    """Spy on every chunk zipfile hands out, to prove how far a bomb got."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.total = 0
        real = zipfile.ZipExtFile.read

        def read(ext: zipfile.ZipExtFile, n: int = -1) -> bytes:
            data = real(ext, n)
            self.total += len(data)
            return data

        monkeypatch.setattr(zipfile.ZipExtFile, "read", read)


def test_bomb_with_lying_headers_stops_at_counted_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 64 MiB of zeros deflates to ~64 KiB; the headers claim 2 MiB. Nothing checks the claim:
    # the counter must stop it after ~1 MiB of real output, long before the CRC check at the end.
    zp = make_zip(tmp_path / "bomb.zip", [reg("bomb.bin", bytes(64 * MiB))])
    assert zp.stat().st_size < 200 * 1024
    patch_claimed_size(zp, 2 * MiB)
    assert zipfile.ZipFile(zp).getinfo("bomb.bin").file_size == 2 * MiB
    spy = CountingReads(monkeypatch)
    with pytest.raises(InvalidCodePackage, match=r"'bomb.bin': unpacked contents exceed .*1048576"):
        unpack.extract(zp, tmp_path / "out", LIMITS)
    assert spy.total <= LIMITS.max_unpacked_bytes + unpack.CHUNK
    assert not (tmp_path / "out").exists()


def test_bomb_with_headers_claiming_tiny_size_is_refused(tmp_path: Path) -> None:
    # zipfile stops at the claimed size, so the truncated output then fails its CRC check.
    zp = make_zip(tmp_path / "bomb.zip", [reg("bomb.bin", bytes(64 * MiB))])
    patch_claimed_size(zp, 100)
    with pytest.raises(InvalidCodePackage, match=r"'bomb.bin': corrupt"):
        unpack.extract(zp, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_limit_counts_all_members_together(tmp_path: Path) -> None:
    half = LIMITS.max_unpacked_bytes // 2
    entries = [reg("a.bin", bytes(half)), reg("b.bin", bytes(half)), reg("c", b"!")]
    zp = make_zip(tmp_path / "code.zip", entries)
    with pytest.raises(InvalidCodePackage, match="'c': unpacked contents exceed"):
        unpack.extract(zp, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_exactly_at_unpacked_limit_is_fine(tmp_path: Path) -> None:
    zp = make_zip(tmp_path / "code.zip", [reg("a.bin", bytes(LIMITS.max_unpacked_bytes))])
    assert unpack.extract(zp, tmp_path / "out", LIMITS) == 1


def test_not_a_zip(tmp_path: Path) -> None:
    zp = tmp_path / "code.zip"
    zp.write_bytes(b"#!/bin/sh\necho this is not a zip\n")
    with pytest.raises(InvalidCodePackage, match="corrupt or not a zip"):
        unpack.extract(zp, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_empty_file_is_not_a_zip(tmp_path: Path) -> None:
    zp = tmp_path / "code.zip"
    zp.write_bytes(b"")
    with pytest.raises(InvalidCodePackage, match="corrupt or not a zip"):
        unpack.extract(zp, tmp_path / "out", LIMITS)


def test_damaged_member_data_is_refused_and_cleaned_up(tmp_path: Path) -> None:
    zp = make_zip(
        tmp_path / "code.zip", [reg("main.py", b"ok\n"), reg("data.bin", os.urandom(50_000))]
    )
    raw = bytearray(zp.read_bytes())
    info = zipfile.ZipFile(zp).getinfo("data.bin")
    start = info.header_offset + 30 + len(b"data.bin")
    for i in range(start + 1000, start + 1100):
        raw[i] ^= 0xFF
    zp.write_bytes(bytes(raw))
    with pytest.raises(InvalidCodePackage, match=r"'data.bin': corrupt"):
        unpack.extract(zp, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.3, 0.7, 0.99])
def test_truncated_zip(tmp_path: Path, keep: float) -> None:
    zp = make_zip(tmp_path / "code.zip", [reg("main.py", b"ok\n"), reg("d.bin", os.urandom(8192))])
    raw = zp.read_bytes()
    zp.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(InvalidCodePackage, match="corrupt"):
        unpack.extract(zp, tmp_path / "out", LIMITS)


def test_partial_extraction_is_removed_from_created_dest(tmp_path: Path) -> None:
    zp = make_zip(
        tmp_path / "code.zip",
        [reg("main.py"), reg("lib/a.py"), reg("lib/big.bin", bytes(2 * MiB))],
    )
    with pytest.raises(InvalidCodePackage):
        unpack.extract(zp, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_partial_extraction_leaves_given_empty_dest_empty(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    zp = make_zip(tmp_path / "code.zip", [reg("main.py"), reg("lib/a.py"), reg("lib/a.py")])
    with pytest.raises(InvalidCodePackage, match=r"'lib/a.py': clashes"):
        unpack.extract(zp, dest, LIMITS)
    assert dest.is_dir() and list(dest.iterdir()) == []


def test_file_and_directory_with_same_name_clash(tmp_path: Path) -> None:
    zp = make_zip(tmp_path / "code.zip", [reg("lib"), reg("lib/a.py")])
    with pytest.raises(InvalidCodePackage, match=r"'lib/a.py': clashes"):
        unpack.extract(zp, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_non_empty_dest_is_refused_and_left_alone(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    zp = make_zip(tmp_path / "code.zip", [reg("main.py")])
    with pytest.raises(FileExistsError):
        unpack.extract(zp, dest, LIMITS)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_encrypted_entry_is_refused(tmp_path: Path) -> None:
    zp = make_zip(tmp_path / "code.zip", [reg("main.py", b"secret")])
    raw = bytearray(zp.read_bytes())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = raw.index(sig) + off
        raw[pos] |= 0x1  # general purpose flag bit 0: encrypted
    zp.write_bytes(bytes(raw))
    with pytest.raises(InvalidCodePackage, match="'main.py': encrypted"):
        unpack.extract(zp, tmp_path / "out", LIMITS)
