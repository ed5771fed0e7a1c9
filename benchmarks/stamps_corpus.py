"""A real picture + speech + caption corpus from Debian's Tux Paint stamps, built into shards by opt_ds's
manifest builder, for checking on real data what `python -m opt_ds.bench learning` checks on synthetic shapes.

    make real-corpus    # apt-get install tuxpaint-stamps-default espeak-ng librsvg2-bin, then this script
    python benchmarks/stamps_corpus.py [--stamps /usr/share/tuxpaint/stamps] [--out .cache/stamps]

Each stamp is a drawing by a person (clip art of animals, food, vehicles, people, places: ~800 PNG, ~250 SVG)
with a one-line English description its artist wrote (the first line of <stamp>.txt: "A lion is a big cat.").
- picture: flattened onto white (stamps are transparent cut-outs), padded to a square, 128 px JPEG;
- speech: the description read aloud, by a person where the stamp ships its own recording (<stamp>_desc.ogg,
  65 stamps), else by espeak-ng in one of several English voices (chosen by the stamp's name, so a rebuild
  gives the same corpus); KEY.json `speech` says which;
- KEY.json `label_name`: the stamp's top folder (animals, food, vehicles, ...), for zero-shot classification.
A fifth of the stamps, chosen by a hash of their path, are held out (`eval/`); the rest are `train/`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import subprocess
import sys
from pathlib import Path

from PIL import Image

from opt_ds.data import build_shards

STAMPS = Path("/usr/share/tuxpaint/stamps")
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us+f3", "en-gb+f2", "en-us+m3")
PICTURE_EXTS = (".png", ".svg")
SIDE = 128
EVAL_SHARE = 0.2


def _hash(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


def description(text_file: Path) -> str | None:
    """The stamp's English description: the first line of its .txt (the others are `lang.utf8=` translations)."""
    lines = text_file.read_text(encoding="utf-8", errors="replace").splitlines()
    first = lines[0].strip() if lines else ""
    return first if first and "=" not in first.split(" ")[0] else None


def flat_picture(path: Path) -> Image.Image:
    """The stamp on white, padded to a square, SIDE px (SVGs rasterised by rsvg-convert)."""
    if path.suffix == ".svg":
        png = subprocess.run(
            ["rsvg-convert", "--keep-aspect-ratio", "--width", str(SIDE * 2), str(path)],
            check=True,
            capture_output=True,
        ).stdout
        picture = Image.open(io.BytesIO(png))
    else:
        picture = Image.open(path)
    picture = picture.convert("RGBA")
    picture.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (SIDE, SIDE), "white")
    canvas.alpha_composite(picture, ((SIDE - picture.width) // 2, (SIDE - picture.height) // 2))
    return canvas.convert("RGB")


def speech(stamp: Path, text: str, out: Path) -> tuple[Path, str]:
    """-> (audio file, who speaks): the stamp's own English recording, else espeak-ng."""
    recorded = stamp.with_name(f"{stamp.stem}_desc.ogg")
    if recorded.is_file():
        return recorded, "recorded"
    voice = VOICES[_hash(stamp.stem) % len(VOICES)]
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(out), text], check=True, capture_output=True)
    return out, f"espeak-ng {voice}"


def write_manifests(stamps: Path, out: Path) -> dict[str, Path]:
    """One CSV manifest per split (key, image, audio, text, label_name, speech), files under out/files."""
    files = out / "files"
    files.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"train": [], "eval": []}
    pictures = {}  # a stamp shipped as both PNG and SVG is the same drawing: its PNG is taken
    for path in sorted(p for p in stamps.rglob("*") if p.suffix in PICTURE_EXTS):
        pictures.setdefault(path.with_suffix(""), path)
    for stamp in pictures.values():
        text_file = stamp.with_suffix(".txt")
        text = description(text_file) if text_file.is_file() else None
        if text is None:
            continue
        relative = stamp.relative_to(stamps)
        key = "_".join(relative.with_suffix("").parts)
        picture = files / f"{key}.jpg"
        flat_picture(stamp).save(picture, quality=90)
        audio, speaker = speech(stamp, text, files / f"{key}.wav")
        split = "eval" if _hash(str(relative)) % 1000 < EVAL_SHARE * 1000 else "train"
        rows[split].append(
            {
                "key": key,
                "image": str(picture.resolve()),
                "audio": str(audio.resolve()),
                "text": text,
                "label_name": relative.parts[0],
                "speech": speaker,
            }
        )
    manifests = {}
    for split, split_rows in rows.items():
        manifests[split] = out / f"{split}.csv"
        with manifests[split].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["key", "image", "audio", "text", "label_name", "speech"])
            writer.writeheader()
            writer.writerows(split_rows)
    return manifests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stamps", type=Path, default=STAMPS, help="Tux Paint's stamps folder")
    parser.add_argument("--out", type=Path, default=Path(".cache/stamps"))
    args = parser.parse_args(argv)
    if not args.stamps.is_dir():
        raise SystemExit(f"{args.stamps}: no Tux Paint stamps here (apt-get install tuxpaint-stamps-default)")
    for split, manifest in write_manifests(args.stamps, args.out).items():
        build_shards.main(
            ["manifest", "--file", str(manifest), "--max-samples", "200", "--out", str(args.out / split), "--quiet"]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
