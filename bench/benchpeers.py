"""What the end-to-end benches stand on: their own redis-server and moto_server on free
loopback ports, boto3 clients through ``AWS_ENDPOINT_URL``, a fresh bucket, and function
zips. A bench's ``Bench`` extends ``Peers`` with its functions and queues."""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import boto3  # noqa: E402
import redis  # noqa: E402

from nanogrid.devtools.embedded import MotoServer, RedisServer  # noqa: E402


def zipped(code: str) -> bytes:
    """A function's zip: ``code`` as its main.py."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("main.py", code)
    return buffer.getvalue()


class ConstantTimeMotoServer(MotoServer):
    """moto_server whose SQS costs do not grow with the queue's depth
    (``moto_constant_time.py`` says why and how)."""

    def command(self) -> list[str]:
        launcher = Path(__file__).with_name("moto_constant_time.py")
        return [sys.executable, str(launcher), "-H", "127.0.0.1", "-p", str(self.port)]


EMULATORS = {"moto": MotoServer, "moto-constant-time": ConstantTimeMotoServer}


AGENT_WORK_ROOT = Path("/var/lib/nanogrid-bench")
"""Where the benches' agents keep their code cache and sandboxes: beside the agent's default
(/var/lib/nanogrid), on the filesystem it would use. On this machine /var/tmp, same disk,
makes a directory and a file in it 5-15x slower (0.5-1.0 ms against 0.05-0.3 ms), which a
first call's unpack and every sandbox create pay."""


class Peers:
    def __init__(self, workdir: Path, emulator: str = "moto") -> None:
        self.workdir = workdir
        self.redis_server = RedisServer(workdir / "redis")
        self.moto = EMULATORS[emulator](workdir / "moto")
        self._agent_dirs: list[Path] = []

    def agent_workdir(self) -> Path:
        """A fresh directory for one agent's files, that sandbox users may pass through;
        removed when the bench ends."""
        AGENT_WORK_ROOT.mkdir(mode=0o711, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="run-", dir=AGENT_WORK_ROOT))
        os.chmod(work, 0o711)
        self._agent_dirs.append(work)
        return work

    def __enter__(self) -> Peers:
        for peer in (self.redis_server, self.moto):
            peer.workdir.mkdir(parents=True, exist_ok=True)
            peer.start()
        os.environ.update(self.moto.environ())
        self.sqs, self.s3 = boto3.client("sqs"), boto3.client("s3")
        self.redis = redis.Redis.from_url(self.redis_server.url)
        self.bucket = f"bench-{uuid.uuid4().hex[:8]}"
        self.s3.create_bucket(
            Bucket=self.bucket,
            CreateBucketConfiguration={"LocationConstraint": os.environ["AWS_DEFAULT_REGION"]},
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.redis.close()
        for peer in (self.moto, self.redis_server):
            peer.stop()
        for work in self._agent_dirs:
            shutil.rmtree(work, ignore_errors=True)
