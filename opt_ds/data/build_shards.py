"""Build WebDataset shards: `python -m opt_ds.data.build_shards {synthetic,narratives,manifest} ... --out DIR`.

Keys are deterministic; shards are bounded by --max-samples/--max-bytes; sizes.json lies beside them.
Missing or unreadable files leave that modality out of the sample (counted); a sample with nothing
usable is skipped (counted). The last line printed is the summary.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Iterator

import soundfile
from PIL import Image
from tqdm import tqdm

from opt_ds.data.formats import AUDIO_EXTS, IMAGE_EXTS, MODALITIES
from opt_ds.data.narratives import cut_audio, narration_windows, utterances, window_meta
from opt_ds.data.synthetic import synthetic_sample
from opt_ds.data.writer import ShardSink, safe_key


def _extension(path: Path, allowed: tuple[str, ...]) -> str | None:
    ext = path.suffix.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    return ext if ext in allowed else None


def _readable(kind: str, data: bytes) -> bool:
    try:
        if kind == "image":
            with Image.open(io.BytesIO(data)) as img:
                img.verify()
        else:
            soundfile.info(io.BytesIO(data))
        return True
    except Exception:
        return False


def add_file(sample: dict, sink: ShardSink, kind: str, path: Path | None, verify: bool) -> None:
    """Put an image or audio file into the sample under its extension, or count why it was left out."""
    if path is None:
        return
    allowed = IMAGE_EXTS if kind == "image" else AUDIO_EXTS
    ext = _extension(path, allowed)
    if ext is None:
        sink.left_out(f"{kind}_unsupported_format")
    elif not path.is_file():
        sink.left_out(f"missing_{kind}")
    else:
        data = path.read_bytes()
        if verify and not _readable(kind, data):
            sink.left_out(f"unreadable_{kind}")
        else:
            sample[ext] = data


def finish_sample(sample: dict, sink: ShardSink, text: str | None, meta: dict) -> None:
    if text is not None and text.strip():
        sample["txt"] = text.strip().encode()
    elif text is not None:
        sink.left_out("empty_text")
    if not any(k in sample for k in ("txt", *IMAGE_EXTS, *AUDIO_EXTS)):
        sink.skip("no_usable_modality")
        return
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    sink.write(sample)


def build_synthetic(args: argparse.Namespace, sink: ShardSink) -> None:
    modalities = tuple(m.strip() for m in args.modalities.split(","))
    for i in tqdm(range(args.num), desc="synthetic", unit="sample", disable=args.quiet):
        sink.write(
            synthetic_sample(
                i, args.seed, args.image_size, args.audio_seconds, modalities, args.image_format, args.audio_format
            )
        )


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{path}:{line_no}: not valid JSON: {exc}") from None


def open_images_tags(labels: Path, names: Path) -> dict[str, list[str]]:
    """Open Images' human-verified image-level labels (ImageID, Source, LabelName, Confidence rows; Confidence 1:
    present) as each image's tags, by their display names (LabelName, DisplayName rows): MVP's visual concepts."""
    with names.open(newline="") as f:
        display = {row[0]: row[1] for row in csv.reader(f) if len(row) >= 2}
    tags: dict[str, list[str]] = {}
    with labels.open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("Confidence") == "1" and row.get("LabelName") in display:
                tags.setdefault(row["ImageID"], []).append(display[row["LabelName"]])
    return tags


def build_narratives(args: argparse.Namespace, sink: ShardSink) -> None:
    """Localized Narratives (Open Images): image_id -> IMAGES/<image_id>.jpg, voice_recording under AUDIO.

    With --window-seconds S > 0 (default 10) a narration with utterance times becomes one sample per window of
    at most S seconds (opt_ds.data.narratives), keyed <key>_w<i>; without usable times it stays whole (counted).
    With --labels and --label-names (Open Images' image-level labels and class names), each picture's verified
    labels become its KEY.json `tags`.
    """
    images, audio = Path(args.images), Path(args.audio)
    if (args.labels is None) != (args.label_names is None):
        raise SystemExit("--labels and --label-names go together (the labels name classes by their MIDs)")
    tags = open_images_tags(Path(args.labels), Path(args.label_names)) if args.labels else {}
    for line_no, rec in tqdm(list(_jsonl(Path(args.jsonl))), desc="narratives", unit="sample", disable=args.quiet):
        if "image_id" not in rec:
            raise SystemExit(f"{args.jsonl}:{line_no}: record has no 'image_id' field")
        sample = {"__key__": safe_key(rec.get("dataset_id", "ln"), rec["image_id"], rec.get("annotator_id", line_no))}
        add_file(sample, sink, "image", images / f"{rec['image_id']}.jpg", args.verify)
        voice = rec.get("voice_recording")
        add_file(sample, sink, "audio", audio / voice if voice else None, args.verify)
        meta = {k: rec[k] for k in ("dataset_id", "image_id", "annotator_id") if k in rec}
        if rec["image_id"] in tags:
            meta["tags"] = tags[rec["image_id"]]
        audio_ext = next((ext for ext in AUDIO_EXTS if ext in sample), None)
        windows = []
        if args.window_seconds > 0 and audio_ext is not None and "timed_caption" in rec:
            try:
                windows = narration_windows(utterances(rec["timed_caption"]), args.window_seconds)
            except ValueError:
                sink.left_out("bad_timed_caption")
        if not windows:
            extra = {k: rec[k] for k in ("timed_caption", "traces") if k in rec}
            finish_sample(sample, sink, rec.get("caption", ""), meta | extra)
            continue
        whole = sample.pop(audio_ext)
        for i, window in enumerate(windows):
            part = sample | {"__key__": f"{sample['__key__']}_w{i}", "flac": cut_audio(whole, window.start, window.end)}
            finish_sample(part, sink, window.caption, meta | window_meta(window, rec.get("traces")))


def _manifest_rows(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            yield from enumerate(csv.DictReader(f), 2)
    else:
        yield from _jsonl(path)


def build_manifest(args: argparse.Namespace, sink: ShardSink) -> None:
    """CSV/JSONL rows with any of image, audio (paths, relative to the manifest) and text (literal text)."""
    path = Path(args.file)
    base = path.parent
    rows = list(_manifest_rows(path))
    if rows and not any(c in rows[0][1] for c in MODALITIES):
        raise SystemExit(
            f"{path}: needs at least one of the columns {', '.join(MODALITIES)}; found {sorted(rows[0][1])}"
        )
    for line_no, row in tqdm(rows, desc="manifest", unit="sample", disable=args.quiet):
        key = safe_key(row["key"]) if row.get("key") else f"{args.prefix}{line_no:09d}"
        sample: dict = {"__key__": key}
        for kind in ("image", "audio"):
            add_file(sample, sink, kind, base / row[kind] if row.get(kind) else None, args.verify)
        meta = {k: v for k, v in row.items() if k not in MODALITIES and v not in (None, "")}
        finish_sample(sample, sink, row.get("text"), meta)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m opt_ds.data.build_shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory (must hold no shards yet)")
    common.add_argument("--max-samples", type=int, default=1000, help="samples per shard at most")
    common.add_argument("--max-bytes", type=float, default=256e6, help="bytes per shard (approximate bound)")
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    sub = parser.add_subparsers(dest="source", required=True)

    syn = sub.add_parser("synthetic", parents=[common], help="agreeing caption/picture/sound triplets")
    syn.add_argument("--num", type=int, required=True)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--image-size", type=int, default=64)
    syn.add_argument("--audio-seconds", type=float, default=2.0)
    syn.add_argument("--modalities", default="image,text,audio", help="comma list; one of them for unpaired shards")
    syn.add_argument("--image-format", default="jpg", choices=["jpg", "png", "webp"])
    syn.add_argument("--audio-format", default="flac", choices=["flac", "wav", "ogg"])

    for name, helptext in (
        ("narratives", "Localized Narratives JSONL + Open Images + voice recordings"),
        ("manifest", "CSV or JSONL manifest with image/audio/text columns"),
    ):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("--no-verify", dest="verify", action="store_false", help="do not check that files decode")
        if name == "narratives":
            p.add_argument("--jsonl", required=True)
            p.add_argument("--images", required=True, help="directory of <image_id>.jpg")
            p.add_argument("--audio", required=True, help="directory the voice_recording paths are relative to")
            p.add_argument(
                "--window-seconds",
                type=float,
                default=10.0,
                help="cut narrations into utterance windows of at most this long (0: keep them whole)",
            )
            p.add_argument("--labels", default=None, help="Open Images image-level labels CSV: pictures' tags")
            p.add_argument("--label-names", default=None, help="Open Images class descriptions CSV (MID, name)")
        else:
            p.add_argument("--file", required=True)
            p.add_argument("--prefix", default="m", help="key prefix for rows without a 'key' column")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sink = ShardSink(args.out, args.max_samples, int(args.max_bytes))
    {"synthetic": build_synthetic, "narratives": build_narratives, "manifest": build_manifest}[args.source](args, sink)
    print(sink.close())
    return 0


if __name__ == "__main__":
    sys.exit(main())
