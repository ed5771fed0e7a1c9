"""Field faults: dirty web data through the real reader. Each case is one that ended (or nearly ended) a run."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import soundfile

from helpers import REPO

STREAM_AND_MEASURE = """
import json, resource, sys
from opt_ds.data.decode import DecodeConfig
from opt_ds.data.stream import ReaderConfig, SourceConfig, make_loader
loader = make_loader([SourceConfig("s", sys.argv[1])], DecodeConfig(max_text_tokens=32),
                     ReaderConfig(batch_size=4, num_workers=0, max_epochs=1, shuffle_shards=False, shuffle_buffer=0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
keys = [k for batch in loader for k in batch["keys"]]
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"keys": keys, "skips": loader.skip_counts(), "grown_mb": grown}))
"""


def wav_bytes(rate: int, seconds: float) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(rate * seconds), dtype=np.float32), rate, format="WAV")
    return buffer.getvalue()


def test_adversarial_samples_are_counted_skips_with_bounded_memory(tmp_path):
    """A KEY.json nested 100k deep (RecursionError escaped the decoder: a crash loop on every resume), a 10 MB
    caption (tokenised whole: +1.3 GB), a WAV whose header says 12503 Hz (a resampling kernel of gigabytes), an
    oversized KEY.json: each sample keeps what is usable, the rest is counted, and memory stays bounded."""
    members = [
        ("deep.txt", b"a caption beside a deep json"),
        ("deep.json", b"[" * 100_000 + b"]" * 100_000),
        ("huge.txt", b"word " * 2_000_000),
        ("oddrate.txt", b"a caption beside odd audio"),
        ("oddrate.wav", wav_bytes(12_503, 0.8)),
        ("bigjson.txt", b"a caption beside a big json"),
        ("bigjson.json", json.dumps({"label_name": "x" * (2 << 20)}).encode()),
        ("fine.txt", b"two red circles"),
        ("fine.wav", wav_bytes(16_000, 0.5)),
    ]
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    proc = subprocess.run(
        [sys.executable, "-c", STREAM_AND_MEASURE, str(tmp_path / "bad.tar")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(report["keys"]) == ["bigjson", "deep", "fine", "huge", "oddrate"]  # every caption survives
    assert report["skips"]["bad_json"] == 2  # the deep and the oversized KEY.json, named in the log
    assert report["skips"]["bad_audio"] == 1  # the odd rate
    assert report["grown_mb"] < 600, report
