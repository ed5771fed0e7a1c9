"""The data layer end to end: builder CLIs, shard specs, decoding, bad input, mixing, resumption."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from helpers import keys_of, loader_workers, run_module, take
from opt_ds.data.batch import normalised_images, to_device
from opt_ds.data.collate import collate
from opt_ds.data.decode import DecodeConfig, SampleDecoder
from opt_ds.data.features import KaldiFbank, float_wave, with_log_mel
from opt_ds.data.shards import ShardSpecError, expand_shards
from opt_ds.data.stream import ReaderConfig, SourceConfig, make_loader
from opt_ds.data.synthetic import synthetic_sample


def read_all(shards, **reader_kw) -> tuple[list[dict], object]:
    cfg = {"batch_size": 4, "num_workers": 0, "max_epochs": 1, "shuffle_buffer": 0, **reader_kw}
    loader = make_loader([SourceConfig("s", shards)], DecodeConfig(), ReaderConfig(**cfg))
    return list(loader), loader


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar as other tools write it (plain tarfile, not our writer)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def audio_bytes(fmt: str, seconds: float = 0.5, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    wave = (0.3 * np.sin(np.arange(int(seconds * rate)) / rate * 2 * np.pi * 440)).astype(np.float32)
    soundfile.write(buf, wave, rate, format=fmt.upper())
    return buf.getvalue()


def image_bytes(size=(40, 30), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format=fmt)
    return buf.getvalue()


# --- builder -------------------------------------------------------------------------------------


def test_synthetic_builder_bounds_shards_and_writes_sizes(synthetic_shards):
    shards = sorted(synthetic_shards.glob("*.tar"))
    sizes = json.loads((synthetic_shards / "sizes.json").read_text())
    assert len(shards) == 6 and sizes == {p.name: 10 for p in shards}
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert names[:4] == ["syn000_00000000.flac", "syn000_00000000.jpg", "syn000_00000000.json", "syn000_00000000.txt"]


def test_synthetic_is_deterministic():
    a, b = synthetic_sample(7, seed=3), synthetic_sample(7, seed=3)
    assert a == b and a != synthetic_sample(8, seed=3)
    meta = json.loads(a["json"])
    assert meta["colour"] in a["txt"].decode() and meta["shape"] in a["txt"].decode()


def test_builder_refuses_non_empty_out(synthetic_shards):
    proc = run_module(
        "opt_ds.data.build_shards", "synthetic", "--num", "2", "--out", str(synthetic_shards), check=False
    )
    assert proc.returncode != 0 and "already holds .tar shards" in proc.stderr


def test_max_bytes_bounds_shards(tmp_path):
    run_module(
        "opt_ds.data.build_shards",
        "synthetic",
        "--num",
        "12",
        "--max-bytes",
        "30000",
        "--out",
        str(tmp_path),
        "--quiet",
    )
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sum(sizes.values()) == 12 and len(sizes) >= 3
    for name in sizes:  # bound is checked before each write: a shard passes it by at most one sample
        assert (tmp_path / name).stat().st_size < 30000 + 60000


def test_narratives_builder_counts_missing_files(tmp_path):
    images, audio = tmp_path / "images", tmp_path / "audio"
    (audio / "voice").mkdir(parents=True)
    images.mkdir()
    (images / "img1.jpg").write_bytes(image_bytes())
    (images / "img2.jpg").write_bytes(image_bytes())
    (audio / "voice" / "a1.ogg").write_bytes(audio_bytes("ogg"))
    records = [
        {
            "dataset_id": "open_images",
            "image_id": "img1",
            "annotator_id": 3,
            "caption": "a red box",
            "voice_recording": "voice/a1.ogg",
        },
        {
            "dataset_id": "open_images",
            "image_id": "img2",
            "annotator_id": 3,
            "caption": "another red box",
            "voice_recording": "voice/missing.ogg",
        },
        {
            "dataset_id": "open_images",
            "image_id": "img3",
            "annotator_id": 5,
            "caption": "no picture",
            "voice_recording": "voice/a1.ogg",
        },
    ]
    jsonl = tmp_path / "ln.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "shards"
    labels, names = tmp_path / "labels.csv", tmp_path / "names.csv"  # Open Images' format: verified labels -> tags
    labels.write_text(
        "ImageID,Source,LabelName,Confidence\nimg1,verification,/m/box,1\nimg1,verification,/m/cat,0\n"
        "img1,crowdsource,/m/red,1\nimg2,verification,/m/unnamed,1\n"
    )
    names.write_text("LabelName,DisplayName\n/m/box,Box\n/m/cat,Cat\n/m/red,Red\n")
    proc = run_module(
        "opt_ds.data.build_shards",
        "narratives",
        "--jsonl",
        str(jsonl),
        "--images",
        str(images),
        "--audio",
        str(audio),
        "--labels",
        str(labels),
        "--label-names",
        str(names),
        "--out",
        str(out),
        "--quiet",
    )
    summary = proc.stdout.strip().splitlines()[-1]
    assert "wrote 3 samples" in summary and "missing_audio: 1" in summary and "missing_image: 1" in summary
    with tarfile.open(next(out.glob("*.tar"))) as tar:
        metas = {m.name: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")}
    assert metas["open_images_img1_3.json"]["tags"] == ["Box", "Red"] and "tags" not in metas["open_images_img2_3.json"]
    batches, _ = read_all(out)
    by_key = {k: i for b in batches for i, k in enumerate(b["keys"])}
    b = batches[0]
    assert set(by_key) == {"open_images_img1_3", "open_images_img2_3", "open_images_img3_5"}
    i = by_key["open_images_img1_3"]
    assert b["has_image"][i] and b["has_audio"][i] and b["has_text"][i]
    assert not b["has_audio"][by_key["open_images_img2_3"]] and not b["has_image"][by_key["open_images_img3_5"]]


def test_narratives_are_cut_into_utterance_windows_whose_audio_and_caption_agree(tmp_path):
    """A 6 s narration with utterance times becomes two samples of at most 3 s: each holds the audio of its
    window and the words spoken in it, its utterance times from the window start and its trace points; a
    record with unusable times stays whole (counted)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "img1.jpg").write_bytes(image_bytes())
    (tmp_path / "n.wav").write_bytes(audio_bytes("wav", seconds=6.0))
    timed = [
        {"utterance": "In this image", "start_time": 0.0, "end_time": 1.5},
        {"utterance": "we can see a box", "start_time": 1.5, "end_time": 3.0},
        {"utterance": "which is red", "start_time": 3.2, "end_time": 4.5},
        {"utterance": "on a table.", "start_time": 4.5, "end_time": 6.0},
    ]
    traces = [[{"x": 0.1, "y": 0.2, "t": 0.5}, {"x": 0.3, "y": 0.2, "t": 3.5}], [{"x": 0.5, "y": 0.5, "t": 5.0}]]
    records = [
        {
            "image_id": "img1",
            "annotator_id": 1,
            "caption": "In this image we can see a box which is red on a table.",
            "voice_recording": "n.wav",
            "timed_caption": timed,
            "traces": traces,
        },
        {
            "image_id": "img1",
            "annotator_id": 2,
            "caption": "a box",
            "voice_recording": "n.wav",
            "timed_caption": [{"utterance": "a box"}],
        },
    ]
    jsonl = tmp_path / "ln.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = run_module(
        "opt_ds.data.build_shards",
        "narratives",
        "--jsonl",
        str(jsonl),
        "--images",
        str(tmp_path / "images"),
        "--audio",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
        "--quiet",
        "--window-seconds",
        "3",
    )
    assert "wrote 3 samples" in proc.stdout and "bad_timed_caption: 1" in proc.stdout, proc.stdout
    members = {}
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        for m in tar.getmembers():
            members[m.name] = tar.extractfile(m).read()
    first, second = json.loads(members["ln_img1_1_w0.json"]), json.loads(members["ln_img1_1_w1.json"])
    assert members["ln_img1_1_w0.txt"] == b"In this image we can see a box"
    assert members["ln_img1_1_w1.txt"] == b"which is red on a table."
    assert soundfile.info(io.BytesIO(members["ln_img1_1_w0.flac"])).duration == pytest.approx(3.0, abs=0.01)
    assert soundfile.info(io.BytesIO(members["ln_img1_1_w1.flac"])).duration == pytest.approx(2.8, abs=0.01)
    assert second["timed_caption"][0] == {"utterance": "which is red", "start_time": 0.0, "end_time": 1.3}
    assert first["traces"] == [[{"x": 0.1, "y": 0.2, "t": 0.5}]] and len(second["traces"]) == 2
    assert "ln_img1_2.wav" in members and json.loads(members["ln_img1_2.json"])["timed_caption"] == [
        {"utterance": "a box"}
    ]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_builder(tmp_path, kind):
    (tmp_path / "a.png").write_bytes(image_bytes(fmt="PNG"))
    (tmp_path / "b.wav").write_bytes(audio_bytes("wav"))
    rewrite = "a blue picture" if kind == "csv" else ["a blue picture"]  # a CSV cell holds one rewrite
    rows = [
        {"image": "a.png", "audio": "", "text": "a red picture", "hard_negatives": rewrite},
        {"image": "", "audio": "b.wav", "text": "", "hard_negatives": ""},
        {"image": "", "audio": "", "text": "just text", "hard_negatives": ""},
        {"image": "", "audio": "", "text": "  ", "hard_negatives": ""},
    ]
    path = tmp_path / f"m.{kind}"
    if kind == "csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "audio", "text", "hard_negatives"])
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_module(
        "opt_ds.data.build_shards", "manifest", "--file", str(path), "--out", str(tmp_path / "out"), "--quiet"
    )
    assert "wrote 3 samples" in proc.stdout and "no_usable_modality: 1" in proc.stdout
    batches, _ = read_all(tmp_path / "out")
    b = batches[0]
    assert b["has_image"].tolist() == [True, False, False]
    assert b["has_audio"].tolist() == [False, True, False]
    assert b["captions"] == ["a red picture", "", "just text"]
    loader = make_loader(
        [SourceConfig("m", str(tmp_path / "out"))],
        DecodeConfig(hard_negatives_per_sample=1),
        ReaderConfig(batch_size=4, num_workers=0, max_epochs=1, shuffle_buffer=0),
    )
    assert next(iter(loader))["has_rewrite"].tolist() == [[True], [False], [False]]


def test_stamps_corpus_pairs_each_drawing_with_its_description_spoken(tmp_path):
    """The real-data corpus (benchmarks/stamps_corpus.py) on a constructed Tux Paint stamps folder: a PNG with its
    own recording, an SVG read by espeak-ng, a stamp shipped as PNG and SVG (one sample), one without a text."""
    stamps = tmp_path / "stamps"
    (stamps / "animals").mkdir(parents=True)
    (stamps / "food").mkdir()
    Image.new("RGBA", (60, 30), (200, 10, 10, 255)).save(stamps / "animals" / "fox.png")  # a wide cut-out
    (stamps / "animals" / "fox.txt").write_text("A red fox.\nfr.utf8=Un renard roux.\n")
    (stamps / "animals" / "fox_desc.ogg").write_bytes(audio_bytes("ogg", seconds=1.0))
    (stamps / "animals" / "fox.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    (stamps / "food" / "pear.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="20" height="20">'
        '<circle cx="10" cy="10" r="9" fill="green"/></svg>'
    )
    (stamps / "food" / "pear.txt").write_text("A green pear.\n")
    Image.new("RGB", (8, 8)).save(stamps / "food" / "untold.png")
    subprocess.run(
        [sys.executable, "benchmarks/stamps_corpus.py", "--stamps", str(stamps), "--out", str(tmp_path / "out")],
        cwd=Path(__file__).resolve().parents[1],
        check=True,
        capture_output=True,
        timeout=120,
    )
    members = {}
    for shard in (tmp_path / "out").glob("*/*.tar"):
        with tarfile.open(shard) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert sorted(n for n in members if n.endswith(".txt")) == ["animals_fox.txt", "food_pear.txt"]
    assert members["animals_fox.txt"] == b"A red fox." and members["food_pear.txt"] == b"A green pear."
    fox, pear = (json.loads(members[f"{k}.json"]) for k in ("animals_fox", "food_pear"))
    assert fox["speech"] == "recorded" and pear["speech"].startswith("espeak-ng ")
    assert (fox["label_name"], pear["label_name"]) == ("animals", "food")
    assert members["animals_fox.ogg"] == (stamps / "animals" / "fox_desc.ogg").read_bytes()
    assert soundfile.info(io.BytesIO(members["food_pear.wav"])).duration > 0.5  # espeak-ng spoke the description
    fox_picture = Image.open(io.BytesIO(members["animals_fox.jpg"]))
    assert fox_picture.size == (128, 128)
    red, green, _ = fox_picture.getpixel((64, 64))
    assert min(fox_picture.getpixel((64, 5))) > 240 and red > 150 and green < 60  # the fox on white, padded
    assert Image.open(io.BytesIO(members["food_pear.jpg"])).getpixel((64, 64))[1] > 100  # the SVG, rasterised


def test_concepts_are_mined_by_caption_count_and_annotated_without_overlap(synthetic_shards, tmp_path):
    """MVP's concepts from the synthetic captions: every phrase kept is held by >= --min-count captions (counted
    here independently), none begins or ends with a function word; annotated copies keep every member and add
    each caption's concepts, longest first and not overlapping; an unreadable caption or KEY.json is counted."""
    from opt_ds.data.concepts import FUNCTION_WORDS, concepts_in, words

    shutil.copytree(synthetic_shards, tmp_path / "shards")
    bad = [("bad.txt", b"\xff\xfe not utf-8"), ("bad.cls", b"3"), ("badjson.txt", b"one red circle")]
    write_tar(tmp_path / "shards" / "shard-000099.tar", [*bad, ("badjson.json", b"{not json")])
    proc = run_module(
        "opt_ds.data.concepts", str(tmp_path / "shards"), "--min-count", "5", "--annotate", str(tmp_path / "out")
    )
    assert "bad_caption: 1, bad_json: 1" in proc.stdout.splitlines()[-1]
    mined = json.loads((tmp_path / "shards" / "concepts.json").read_text())
    size = len(mined["concepts"]) + len(set(mined["tags"]) - set(mined["concepts"])) + 2  # the two reserved ids
    assert f"(concept_vocab_size >= {size})" in proc.stdout
    vocabulary = mined["concepts"]
    assert mined["captions"] == 61 and {"picture", "one", "red"} <= set(vocabulary) and "picture of" not in vocabulary
    assert list(vocabulary.values()) == sorted(vocabulary.values(), reverse=True)  # most frequent first
    original = {}
    for shard in sorted((tmp_path / "shards").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            original |= {m.name: tar.extractfile(m).read() for m in tar}
    tagged = Counter(
        t for k, v in original.items() if k.endswith(".json") and k != "badjson.json" for t in json.loads(v)["tags"]
    )
    assert mined["tags"] == {tag: n for tag, n in tagged.items() if n >= 5} and mined["tags"]  # the pictures' tags
    captions = [" ".join(words(v.decode())) for k, v in original.items() if k.endswith(".txt") and k != "bad.txt"]
    for phrase, count in vocabulary.items():
        first, last = phrase.split()[0], phrase.split()[-1]
        assert first not in FUNCTION_WORDS and last not in FUNCTION_WORDS
        assert count == sum(f" {phrase} " in f" {c} " for c in captions) >= 5, phrase

    annotated = {}
    for shard in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(shard) as tar:
            annotated |= {m.name: tar.extractfile(m).read() for m in tar}
    assert {k for k in annotated if not k.endswith(".json")} == {k for k in original if not k.endswith(".json")}
    assert json.loads(annotated["bad.json"]) == {}  # its caption unreadable: kept, with no concepts
    assert json.loads(annotated["badjson.json"]) == {"concepts": concepts_in("one red circle", set(vocabulary), 3)}
    for name, data in original.items():
        if name == "badjson.json":  # checked above
            continue
        if name.endswith(".json"):
            meta, before = json.loads(annotated[name]), json.loads(data)
            caption = " ".join(words(original[name.replace(".json", ".txt")].decode()))
            assert all(f" {c} " in f" {caption} " for c in before.pop("concepts"))  # the builder's, replaced
            assert len(before["tags"]) == 2  # the picture's shape and colour
            assert meta.pop("concepts") == concepts_in(caption, set(vocabulary), 3) and meta == before
        else:
            assert annotated[name] == data
    assert concepts_in("two red circle near a red", {"red circle", "circle", "red", "two"}, 3) == [
        "red circle",
        "two",
        "red",
    ]


def test_concepts_and_tags_become_vocabulary_ids_in_fixed_slots_and_bad_fields_are_counted(tmp_path):
    """A sample's KEY.json concepts (else the vocabulary's phrases its caption holds) and, with a picture, its tags
    become ids in concepts_per_sample / tags_per_sample slots (padded with 0; words outside the vocabulary dropped);
    a malformed field is counted and the rest of its sample kept; no vocabulary, no slots."""
    from opt_ds.data.concepts import ConceptVocabulary
    from opt_ds.model.config import CONCEPT_RESERVED_IDS

    vocabulary_file = tmp_path / "concepts.json"
    vocabulary_file.write_text(
        json.dumps(
            {"max_words": 3, "concepts": {"red circles": 9, "two": 8, "red": 7}, "tags": {"circle": 5, "red": 4}}
        )
    )
    vocabulary = ConceptVocabulary.load(vocabulary_file)
    assert vocabulary.ids == {"red circles": 2, "two": 3, "red": 4, "circle": 5}  # "red" the tag: the concept's id
    assert vocabulary.size == 4 + CONCEPT_RESERVED_IDS
    members = [
        ("given.txt", b"Two red circles."),
        ("given.jpg", image_bytes()),
        (
            "given.json",
            json.dumps({"concepts": ["two", "Red  Circles", "unknown"], "tags": ["circle", "red"]}).encode(),
        ),
        ("mined.txt", b"two red circles and more"),
        ("picture.jpg", image_bytes()),
        ("picture.json", json.dumps({"tags": "red"}).encode()),
        ("malformed.txt", b"two circles"),
        ("malformed.jpg", image_bytes()),
        ("malformed.json", json.dumps({"concepts": [3], "tags": {"not": "a list"}}).encode()),
    ]
    write_tar(tmp_path / "c-0.tar", members)
    reader = ReaderConfig(batch_size=8, num_workers=0, max_epochs=1, shuffle_shards=False, shuffle_buffer=0)
    decode = DecodeConfig(concepts=str(vocabulary_file), concepts_per_sample=2, tags_per_sample=3)
    loader = make_loader([SourceConfig("s", str(tmp_path / "c-0.tar"))], decode, reader)
    (b,) = list(loader)
    assert b["keys"] == ["given", "mined", "picture", "malformed"]
    assert b["concept_ids"].tolist() == [[3, 2], [2, 3], [0, 0], [0, 0]]  # mined: "red circles" before "two"
    assert b["tag_ids"].tolist() == [[5, 4, 0], [0, 0, 0], [4, 0, 0], [0, 0, 0]]  # no picture, no tags
    assert loader.skip_counts() == {"bad_concepts": 1, "bad_tags": 1}
    assert b["has_text"].tolist() == [True, True, False, True] and b["has_image"][3]  # the bad sample kept
    with pytest.raises(ValueError, match="not a concept vocabulary"):
        ConceptVocabulary.load(tmp_path / "c-0.tar")
    (plain,), _ = read_all(str(tmp_path / "c-0.tar"), batch_size=8)
    assert "concept_ids" not in plain and "tag_ids" not in plain


# --- shard specs ---------------------------------------------------------------------------------


def test_shard_specs(synthetic_shards, tmp_path):
    from_dir = expand_shards(str(synthetic_shards))
    assert len(from_dir) == 6
    assert expand_shards(str(synthetic_shards / "shard-{000000..000005}.tar")) == from_dir
    listing = tmp_path / "shards.txt"
    listing.write_text("# my shards\n" + "\n".join(from_dir[:2]) + "\n")
    assert expand_shards(str(listing)) == from_dir[:2]
    with pytest.raises(
        ShardSpecError, match=r"shard-000006.tar, \S+shard-000007.tar, \S+shard-000008.tar \(and 1 more\)"
    ):
        expand_shards(str(synthetic_shards / "shard-{000000..000009}.tar"))
    listing.write_text(from_dir[0] + "\npipe:curl -s http://example.com/x.tar | tee /tmp/owned\n")
    with pytest.raises(ShardSpecError, match="holds a command .'pipe:curl"):  # webdataset would run it in a shell
        expand_shards(str(listing))
    assert expand_shards("pipe:cat " + from_dir[0]) == ["pipe:cat " + from_dir[0]]  # in the config itself: meant
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSpecError, match="holds no .tar"):
        expand_shards(str(tmp_path / "empty"))
    with pytest.raises(ShardSpecError, match="empty"):
        expand_shards([""])


def test_missing_shard_is_a_startup_error_in_the_cli(tmp_path):
    proc = run_module("opt_ds.data.inspect", str(tmp_path / "nowhere-{0..3}.tar"), check=False)
    assert proc.returncode == 2 and "shard not found" in proc.stderr and "Traceback" not in proc.stderr


# --- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
def test_audio_formats_decode_to_16k_waves_whose_frames_the_batch_counts(fmt):
    decode = DecodeConfig()
    wave = SampleDecoder(decode).waveform(audio_bytes(fmt, seconds=1.0, rate=22050))  # resampled to 16 kHz
    assert wave.dtype == torch.float32 and 15_900 <= wave.shape[0] <= 16_100
    batch = with_log_mel(collate([{"key": "a", "audio": wave}], decode), decode)
    assert batch["audio"].shape[2] == 80 and batch["audio_mask"].sum() == 1 + (wave.shape[0] - 400) // 160
    assert torch.isfinite(batch["audio"]).all() and "waveform" not in batch


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("fmt, subtype", [("FLAC", "PCM_16"), ("FLAC", "PCM_24"), ("WAV", "PCM_16"), ("WAV", "FLOAT")])
def test_a_waveform_read_as_stored_is_libsndfiles_float_read(fmt, subtype, channels):
    """Mono 16-bit PCM stays int16 as stored (half the bytes to the trainer, no conversion in the worker) and is
    scaled where its frames are made: the same floats as libsndfile's own float read, bit for bit."""
    rng = np.random.default_rng(channels)
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * rng.standard_normal((8000, channels))).astype(np.float32), 16000, subtype, format=fmt)
    expected = soundfile.read(io.BytesIO(buf.getvalue()), dtype="float32", always_2d=True)[0].mean(axis=1)
    wave = SampleDecoder(DecodeConfig()).waveform(buf.getvalue())
    assert wave.dtype == (torch.int16 if (subtype, channels) == ("PCM_16", 1) else torch.float32)
    assert torch.equal(float_wave(wave), torch.from_numpy(expected))


def kaldi_reference(wave: torch.Tensor, rate: int, n_mels: int) -> torch.Tensor:
    import torchaudio

    return torchaudio.compliance.kaldi.fbank(
        wave.unsqueeze(0),
        num_mel_bins=n_mels,
        sample_frequency=rate,
        frame_length=25.0,
        frame_shift=10.0,
        dither=0.0,
        htk_compat=True,
        window_type="hanning",
    )


def test_the_filterbank_equals_torchaudios_kaldi_fbank():
    """The log-mel (window and mel matrix built once) against kaldi.fbank at the same settings, on speech-like,
    tonal, silent and shortest inputs, at two sample rates: clip by clip, and as one zero-padded batch made into
    normalised frames the way to_device does it (each clip's frames, zeros after them; int16 and float clips in
    one batch)."""
    generator = torch.Generator().manual_seed(0)
    for rate, n_mels in ((16_000, 80), (8_000, 40)):
        fbank = KaldiFbank(rate, n_mels)
        t = torch.arange(rate * 3) / rate
        waves = [
            0.1 * torch.randn(rate * 3, generator=generator),
            0.3 * torch.sin(2 * torch.pi * 440 * t[: rate * 2]) * torch.sin(2 * torch.pi * 3 * t[: rate * 2]),
            torch.zeros(rate),
            torch.randn(rate * 25 // 1000, generator=generator),
            torch.randint(-(2**15), 2**15, (rate,), generator=generator, dtype=torch.int16),  # 16-bit PCM as stored
        ]
        references = [kaldi_reference(float_wave(wave), rate, n_mels) for wave in waves]
        for wave, reference in zip(waves, references):
            assert fbank(float_wave(wave)).shape == reference.shape
            torch.testing.assert_close(fbank(float_wave(wave)), reference, atol=1e-4, rtol=1e-5)
        decode = DecodeConfig(sample_rate=rate, n_mels=n_mels)
        samples = [{"key": str(i), "audio": wave} for i, wave in enumerate(waves)] + [{"key": "no audio"}]
        batch = to_device(collate(samples, decode), torch.device("cpu"), torch.float32, decode)
        assert batch["audio_mask"].sum(1).tolist() == [r.shape[0] for r in references] + [0]
        for i, reference in enumerate(references):
            normalised = (reference - decode.fbank_mean) / (2 * decode.fbank_std)
            torch.testing.assert_close(batch["audio"][i, : reference.shape[0]], normalised, atol=1e-4, rtol=1e-5)
        assert not batch["audio"][~batch["audio_mask"]].any()


def test_audio_is_cut_to_max_seconds():
    decoder = SampleDecoder(DecodeConfig(max_audio_seconds=0.5))
    assert decoder.waveform(audio_bytes("flac", seconds=3.0)).shape == (8000,)


def test_image_resize_crop_normalise():
    decoder = SampleDecoder(DecodeConfig(image_size=32))
    image = decoder.image(image_bytes((120, 60)))  # a red picture, twice as wide as high
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and image[0].float().mean() > 150
    normalised = normalised_images(image[None])
    assert normalised.dtype == torch.float32 and normalised[0, 0].mean() > 1.0  # red well above the mean


# --- the reader ----------------------------------------------------------------------------------


def test_shards_hold_one_header_per_member(synthetic_shards):
    """Whole-second mtimes: a fractional one gives every member a pax header too, a second header to read."""
    with tarfile.open(sorted(synthetic_shards.glob("*.tar"))[0]) as tar:
        members = tar.getmembers()
    assert members and all(m.pax_headers == {} and m.mtime == int(m.mtime) for m in members)


def test_one_epoch_reads_every_sample_once(synthetic_shards):
    batches, loader = read_all(synthetic_shards, num_workers=2, shuffle_buffer=16)
    keys = keys_of(batches)
    assert len(keys) == 60 and len(set(keys)) == 60
    b = batches[0]
    assert b["image"].shape == (4, 3, 64, 64) and b["waveform"].dtype == torch.int16 and b["text_ids"].shape[0] == 4
    assert b["text_mask"].sum(1).min() >= 3 and b["audio_mask"].sum(1).min() >= 90
    assert loader.samples_read() == 60 and loader.skip_counts() == {}


@pytest.mark.parametrize("workers", [1, 2])
def test_ranks_and_workers_split_without_overlap(synthetic_shards, workers):
    seen = []
    for rank in range(2):
        loader = make_loader(
            [SourceConfig("s", str(synthetic_shards))],
            DecodeConfig(),
            ReaderConfig(batch_size=4, num_workers=workers, max_epochs=1),
            rank=rank,
            world_size=2,
        )
        seen.append(keys_of(list(loader)))
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 60


def test_loader_workers_start_with_iter_and_run_at_the_configured_niceness(synthetic_shards):
    """Workers start when the stream is opened (the trainer opens it before building the engine, so they decode
    meanwhile), and at low priority, so that on a busy CPU node they do not preempt the ranks mid-step."""
    import psutil

    def processes() -> set[int]:
        return {p.pid for p in psutil.Process().children(recursive=True)}

    loader = make_loader(
        [SourceConfig("s", str(synthetic_shards))],
        DecodeConfig(),
        ReaderConfig(batch_size=4, num_workers=2, worker_nice=7),
    )
    before = processes()
    batches = iter(loader)
    assert len(processes() - before) >= 2  # before any next()
    next(batches), next(batches)  # one batch from each worker: both have run their start-up
    niceness = [p.nice() for p in loader_workers()]  # not their shm managers, which are the workers' children
    assert niceness == [os.nice(0) + 7] * 2, niceness


SLURM_WARNED_LOADER = """
import signal, sys
import psutil
from opt_ds.data.decode import DecodeConfig
from opt_ds.data.stream import ReaderConfig, SourceConfig, make_loader
from opt_ds.data.workers import start_worker_server
from opt_ds.train.signals import StopRequest

start_worker_server()
stop = StopRequest()
batches = iter(make_loader([SourceConfig("s", sys.argv[1])], DecodeConfig(), ReaderConfig(batch_size=2, num_workers=2)))
next(batches)
for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:  # as Slurm does: every process of the step
    p.send_signal(signal.SIGUSR1)
print(stop.requested, sum(len(next(batches)["keys"]) for _ in range(10)))
"""


def test_loader_workers_survive_slurms_usr1_to_the_whole_step(synthetic_shards):
    """The rank notes the stop and checkpoints at the next step boundary; its workers, their server and the
    resource tracker go on until then (a worker killed by the signal broke the preempted Slurm job's stream),
    and the process still exits at once."""
    proc = subprocess.run(
        [sys.executable, "-c", SLURM_WARNED_LOADER, str(synthetic_shards)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "20"], proc.stdout
    assert "resource_tracker" not in proc.stderr, proc.stderr[-3000:]


def test_fewer_shards_than_slots_splits_by_sample(tmp_path):
    run_module("opt_ds.data.build_shards", "synthetic", "--num", "9", "--out", str(tmp_path), "--quiet")
    seen = []
    for rank in range(2):
        loader = make_loader(
            [SourceConfig("s", str(tmp_path))],
            DecodeConfig(),
            ReaderConfig(batch_size=2, num_workers=2, max_epochs=1),
            rank=rank,
            world_size=2,
        )
        seen += keys_of(list(loader))
    assert sorted(seen) == [f"syn000_{i:08d}" for i in range(9)]


def test_shuffle_is_seeded_and_changes_per_epoch(synthetic_shards):
    order = lambda seed: keys_of(read_all(synthetic_shards, seed=seed, shuffle_buffer=20, max_epochs=2)[0])  # noqa: E731
    a, b, c = order(1), order(1), order(2)
    assert a == b and a != c
    assert a[:60] != a[60:] and sorted(a[:60]) == sorted(a[60:])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_neither_repeats_nor_skips(synthetic_shards, workers):
    """Read K batches, save the state, restart a new loader from it: the union is one uninterrupted pass."""
    cfg = ReaderConfig(batch_size=4, num_workers=workers, shuffle_buffer=8, max_epochs=1, seed=5)
    full = keys_of(list(make_loader([SourceConfig("s", str(synthetic_shards))], DecodeConfig(), cfg)))
    first = make_loader([SourceConfig("s", str(synthetic_shards))], DecodeConfig(), cfg)
    head = []
    for batch in first:
        head += batch["keys"]
        if len(head) >= 20:
            break
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    second = make_loader([SourceConfig("s", str(synthetic_shards))], DecodeConfig(), cfg)
    second.load_state_dict(state)
    tail = keys_of(list(second))
    assert len(head) + len(tail) == len(full) == 60
    assert sorted(head + tail) == sorted(full)


def test_resume_of_an_endless_stream_continues_the_exact_batch_order(synthetic_shards):
    """Training streams forever; resumption rotates workers so batches come in the uninterrupted order."""
    cfg = ReaderConfig(batch_size=4, num_workers=2, shuffle_buffer=8, seed=9)
    make = lambda: make_loader([SourceConfig("s", str(synthetic_shards))], DecodeConfig(), cfg)  # noqa: E731

    reference = take(make(), 40)  # crosses epochs
    first = make()
    head = take(first, 17)
    second = make()
    second.load_state_dict(first.state_dict())
    assert head + take(second, 23) == reference


def test_state_from_another_layout_is_refused(synthetic_shards):
    loader = make_loader([SourceConfig("s", str(synthetic_shards))], DecodeConfig(), ReaderConfig(num_workers=2))
    state = loader.state_dict()
    other = make_loader([SourceConfig("s", str(synthetic_shards))], DecodeConfig(), ReaderConfig(num_workers=1))
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)


def test_sources_mix_with_weights(tmp_path):
    for name, mods in (("text", "text"), ("image", "image")):
        run_module(
            "opt_ds.data.build_shards",
            "synthetic",
            "--num",
            "300",
            "--modalities",
            mods,
            "--out",
            str(tmp_path / name),
            "--quiet",
            "--seed",
            "1" if name == "text" else "2",
        )
    loader = make_loader(
        [SourceConfig("text", str(tmp_path / "text"), 3.0), SourceConfig("image", str(tmp_path / "image"), 1.0)],
        DecodeConfig(),
        ReaderConfig(batch_size=10, num_workers=0),
    )
    sources: Counter[str] = Counter()
    for i, batch in enumerate(loader):
        sources.update(batch["sources"])
        for j, src in enumerate(batch["sources"]):
            assert bool(batch["has_text"][j]) == (src == "text") and bool(batch["has_image"][j]) == (src == "image")
        if i == 39:
            break
    assert 0.68 < sources["text"] / 400 < 0.82


# --- shards from other tools, and bad input ------------------------------------------------------


def test_img2dataset_and_audio_caption_shards_load_unchanged(tmp_path):
    img2dataset = write_tar(
        tmp_path / "00000.tar",
        [
            ("000000000.jpg", image_bytes()),
            ("000000000.txt", b"a red rectangle"),
            (
                "000000000.json",
                json.dumps({"url": "http://x/y.jpg", "key": "000000000", "status": "success", "width": 40}).encode(),
            ),
            ("000000001.jpg", image_bytes((64, 64))),
            ("000000001.txt", b"another one"),
            ("000000001.json", json.dumps({"url": "http://x/z.jpg", "key": "000000001"}).encode()),
        ],
    )
    audio_caption = write_tar(
        tmp_path / "audio-00000.tar",
        [
            ("clip_a.flac", audio_bytes("flac")),
            ("clip_a.json", json.dumps({"text": "a dog barks", "duration": 0.5}).encode()),
            ("clip_b.flac", audio_bytes("flac")),
            ("clip_b.json", json.dumps({"text": "rain falls"}).encode()),
        ],
    )
    (b,), _ = read_all(str(img2dataset))
    assert b["has_image"].all() and b["has_text"].all() and not b["has_audio"].any()
    assert b["captions"] == ["a red rectangle", "another one"]
    (b,), _ = read_all(str(audio_caption))
    assert b["has_audio"].all() and not b["has_image"].any() and b["captions"] == ["a dog barks", "rain falls"]


def test_caption_rewrites_fill_fixed_slots_and_bad_ones_are_counted(tmp_path):
    """K = paraphrases + hard negatives slots per sample, whatever each sample holds (ranks share one shape);
    a malformed rewrite field is counted and the rest of its sample kept."""
    members = [
        ("full.txt", b"two red circles"),
        (
            "full.json",
            json.dumps(
                {
                    "paraphrases": ["a picture of two red circles", "there are two red circles here"],
                    "hard_negatives": ["two blue circles", "three red circles", "two red squares"],
                }
            ).encode(),
        ),
        ("csvrow.txt", b"one cat"),
        ("csvrow.json", json.dumps({"hard_negatives": "one dog"}).encode()),
        ("plain.txt", b"no rewrites"),
        ("imageonly.jpg", image_bytes()),
        ("imageonly.json", json.dumps({"paraphrases": ["ignored: no caption"]}).encode()),
        ("malformed.txt", b"kept anyway"),
        ("malformed.json", json.dumps({"paraphrases": [3]}).encode()),
    ]
    write_tar(tmp_path / "r-0.tar", members)
    decode = DecodeConfig(paraphrases_per_sample=1, hard_negatives_per_sample=2)
    loader = make_loader(
        [SourceConfig("s", str(tmp_path / "r-0.tar"))],
        decode,
        ReaderConfig(batch_size=8, num_workers=0, max_epochs=1, shuffle_shards=False, shuffle_buffer=0),
    )
    (b,) = list(loader)
    assert b["keys"] == ["full", "csvrow", "plain", "imageonly", "malformed"]
    assert b["rewrite_ids"].shape[:2] == (5, 3) and b["rewrite_mask"].shape == b["rewrite_ids"].shape
    assert b["has_rewrite"].tolist() == [
        [True, True, True],
        [False, True, False],
        [False] * 3,
        [False] * 3,
        [False] * 3,
    ]
    assert b["rewrite_positive"].tolist() == [[True, False, False]] * 5
    tok = SampleDecoder(decode).tokenizer
    words = [
        tok.decode(ids[mask], skip_special_tokens=True) for ids, mask in zip(b["rewrite_ids"][0], b["rewrite_mask"][0])
    ]
    assert words == ["a picture of two red circles", "two blue circles", "three red circles"]
    assert tok.decode(b["rewrite_ids"][1, 1][b["rewrite_mask"][1, 1]], skip_special_tokens=True) == "one dog"
    assert not b["rewrite_mask"][2:].any()
    assert loader.skip_counts() == {"bad_rewrites": 1}
    (plain,), _ = read_all(str(tmp_path / "r-0.tar"), batch_size=8)  # the default config batches no rewrites
    assert not any(k.startswith("rewrite") or k == "has_rewrite" for k in plain)


def test_synthetic_rewrites_change_one_attribute():
    from opt_ds.data.synthetic import COLOURS, COUNTS, SHAPES

    def attributes(caption: str) -> tuple[str, ...]:
        words = caption.split()
        return (
            next(w for w in words if w in COUNTS),
            next(w for w in words if w in COLOURS),
            next(s for s in SHAPES for w in words if w.startswith(s)),
        )

    sample = synthetic_sample(3)
    meta, caption = json.loads(sample["json"]), sample["txt"].decode()
    assert meta["paraphrases"][0] != caption and attributes(meta["paraphrases"][0]) == attributes(caption)
    changed = [
        [i for i, (a, b) in enumerate(zip(attributes(caption), attributes(n))) if a != b]
        for n in meta["hard_negatives"]
    ]
    assert sorted(changed) == [[0], [1], [2]], (caption, meta["hard_negatives"])


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/opt_ds_unpickled"),))


def test_bad_input_is_skipped_and_counted(tmp_path):
    good = synthetic_sample(0)
    Path("/tmp/opt_ds_unpickled").unlink(missing_ok=True)
    members = [(f"good.{ext}", data) for ext, data in good.items() if ext != "__key__"]
    members += [
        ("badjpg.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"),
        ("badjpg.txt", b"caption survives"),
        ("badwav.wav", b"RIFF....WAVEfmt garbage"),
        ("emptycap.txt", b"   \n"),
        ("bomb.png", image_bytes((3000, 3000), fmt="PNG")),
        ("bomb.txt", b"too many pixels"),
        ("pickled.pyd", pickle.dumps(_Exploit())),
        ("pickled.pth", pickle.dumps(_Exploit())),
    ]
    write_tar(tmp_path / "bad-0.tar", members)
    # members of 512 header + 2048 data bytes: cut one inside member 5's data, one at member 8's header
    full = write_tar(
        tmp_path / "whole.tar", [(f"t{i}.txt", f"caption {i:02d}".encode() * 200) for i in range(20)]
    ).read_bytes()
    (tmp_path / "bad-1.tar").write_bytes(full[: 5 * 2560 + 1000])
    (tmp_path / "bad-2.tar").write_bytes(full[: 8 * 2560])
    (tmp_path / "whole.tar").unlink()

    loader = make_loader(
        [SourceConfig("s", str(tmp_path / "bad-{0..2}.tar"))],
        DecodeConfig(max_image_pixels=1_000_000),
        ReaderConfig(batch_size=64, num_workers=0, max_epochs=1, shuffle_shards=False, shuffle_buffer=0),
    )
    keys = keys_of(list(loader))
    skips = loader.skip_counts()
    assert "good" in keys and "badjpg" in keys and "bomb" in keys  # text part survives
    assert "badwav" not in keys and "emptycap" not in keys and "pickled" not in keys
    assert skips["bad_image"] == 1 and skips["oversize_image"] == 1 and skips["bad_audio"] == 1
    assert skips["empty_caption"] == 1 and skips["no_usable_modality"] == 3
    assert skips["tar_error"] >= 1 and skips["truncated_tar"] == 2
    assert sum(k.startswith("t") for k in keys) == 5 + 8  # what preceded each cut is kept
    assert not Path("/tmp/opt_ds_unpickled").exists()


def test_oversize_sample_is_skipped(synthetic_shards):
    loader = make_loader(
        [SourceConfig("s", str(synthetic_shards))],
        DecodeConfig(max_sample_bytes=1000),
        ReaderConfig(batch_size=4, num_workers=0, max_epochs=1),
    )
    assert list(loader) == [] and loader.skip_counts() == {"oversize_sample": 60}


def test_inspect_cli_reports_json(synthetic_shards):
    proc = run_module("opt_ds.data.inspect", str(synthetic_shards), "--json", "--limit", "25", "--workers", "1")
    report = json.loads(proc.stdout)
    assert report["samples"] == 25 and report["by_modalities"] == {"image+text+audio": 25}
    assert report["shards"] == 6 and report["samples_per_s"] > 0
    table = run_module("opt_ds.data.inspect", str(synthetic_shards), "--workers", "0").stdout
    assert "60 samples from 6 shards" in table and "image+text+audio" in table


def test_a_shard_directory_removed_mid_run_is_an_error_naming_the_shards(tmp_path):
    """The shards go away while a run reads them: what was open is read, the rest is counted, and the stream ends
    with an error saying the shards could not be read (it used to blame ranks x workers)."""
    shards = tmp_path / "s"
    run_module("opt_ds.data.build_shards", "synthetic", "--num", "20", "--max-samples", "10", "--out", str(shards))
    loader = make_loader(
        [SourceConfig("s", str(shards))],
        DecodeConfig(),
        ReaderConfig(batch_size=4, num_workers=0, shuffle_buffer=0, shuffle_shards=False),
    )
    batches = iter(loader)
    next(batches)
    shutil.rmtree(shards)
    with pytest.raises(RuntimeError, match=r"2 of its shards could not be read \(first: .*shard-00000\d\.tar: "):
        for _ in range(20):
            next(batches)


def test_images_decode_only_in_the_formats_image_extensions_name():
    """A PNG saved as .jpg decodes (common on the web); an EPS or a BMP never reaches its parser (EPS runs
    Ghostscript) and is counted as bad_image, the caption kept."""
    decoder = SampleDecoder(DecodeConfig())
    out, problems = decoder({"__key__": "k", "jpg": image_bytes((32, 32), fmt="PNG"), "txt": b"a png named .jpg"})
    assert "image" in out and problems == []
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    for data in (eps, image_bytes((32, 32), fmt="BMP")):
        out, problems = decoder({"__key__": "k", "jpg": data, "txt": b"a caption"})
        assert "image" not in out and "text_ids" in out and [p[0] for p in problems] == ["bad_image"]
