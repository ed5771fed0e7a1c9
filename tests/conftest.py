"""Shared fixtures: small shard sets built by the real builder, in a session-wide temp folder; the S3 endpoint of
the suite."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

from helpers import run_module


def _unused_fixed_port() -> int:
    """A free port below Linux's ephemeral range, which no test's free_port() (port 0) can be handed meanwhile."""
    while True:
        port = random.randint(20_000, 32_000)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port


# Every S3 request of the suite goes to the local server of tests/test_remote.py, never to AWS. Set here, before
# any loader worker server starts: the workers take their environment from it.
S3_PORT = _unused_fixed_port()
os.environ.update(
    AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """60 triplets in 6 shards of 10."""
    out = tmp_path_factory.mktemp("data") / "triplets"
    run_module(
        "opt_ds.data.build_shards",
        "synthetic",
        "--num",
        "60",
        "--max-samples",
        "10",
        "--out",
        str(out),
        "--quiet",
        "--audio-seconds",
        "1.0",
    )
    return out
