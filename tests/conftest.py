"""Shared fixtures: small shard sets built by the real builder, in a session-wide temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_module


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
