"""`make demo`: synthetic shards -> a short VQ-VAE stage -> 2-rank ZeRO-3 bf16 pre-training of `tiny` with all
tasks -> export -> evaluation table. Re-running continues or reuses what is already there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from opt_ds.data import build_shards
from opt_ds.dist.launch import local_training_command

DEMO_DATA = Path("demo_data")
DEMO_RUN = Path("demo_run")
RANKS = int(os.environ.get("OPT_DS_DEMO_RANKS", "2"))


def ensure_shards(name: str, *builder_args: str) -> Path:
    """Build into a temporary folder and rename, so an interrupted build is never mistaken for a finished one."""
    out = DEMO_DATA / name
    if not (out / "sizes.json").is_file():
        tmp = DEMO_DATA / f"{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        build_shards.main([*builder_args, "--out", str(tmp), "--quiet"])
        tmp.rename(out)
    return out


def run(*cmd: str) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(config: str, output: Path, *extra: str) -> None:
    run(*local_training_command(RANKS, "--config", config, "--output", str(output), "--resume", "auto", *extra))


def main() -> int:
    ensure_shards("train", "synthetic", "--num", "2000", "--max-samples", "250", "--seed", "0")
    ensure_shards("eval", "synthetic", "--num", "200", "--seed", "7")
    ensure_shards("text_only", "synthetic", "--num", "400", "--seed", "8", "--modalities", "text")
    ensure_shards("image_only", "synthetic", "--num", "400", "--seed", "9", "--modalities", "image")

    vqvae = DEMO_RUN / "vqvae.safetensors"
    if not vqvae.is_file():
        train("opt_ds/configs/vqvae_tiny.yaml", DEMO_RUN / "vqvae")
        run(
            sys.executable,
            "-m",
            "opt_ds.export",
            "--checkpoint",
            str(DEMO_RUN / "vqvae" / "checkpoints"),
            "--out",
            str(vqvae),
        )
    train("opt_ds/configs/demo.yaml", DEMO_RUN / "pretrain", "--set", f"image_tokenizer={vqvae}")
    weights = DEMO_RUN / "opt_tiny.safetensors"
    run(
        sys.executable,
        "-m",
        "opt_ds.export",
        "--checkpoint",
        str(DEMO_RUN / "pretrain" / "checkpoints"),
        "--out",
        str(weights),
    )
    run(sys.executable, "-m", "opt_ds.evaluate", "--weights", str(weights), "--shards", str(DEMO_DATA / "eval"))
    print(f"\nrun directory: {DEMO_RUN / 'pretrain'} (config.yaml, checkpoints/, logs/, summary.json)")
    print(f"TensorBoard:   tensorboard --logdir {DEMO_RUN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
