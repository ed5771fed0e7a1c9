"""Localized Narratives as they are: a narration runs 30-60 s while a sample's audio is cut at
`data.decode.max_audio_seconds` (10 s by default), so the whole caption would describe far more than the
audio says. The narration's own utterance times (`timed_caption`) cut it into windows of consecutive
utterances, each at most `seconds` long: every window is a sample with the same picture, the audio of the
window and the words spoken in it, so audio and caption agree. The window's utterance times (from its
start) and the mouse-trace points of its time span stay in its KEY.json.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import soundfile


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    utterances: list[dict]

    @property
    def caption(self) -> str:
        return " ".join(u["utterance"].strip() for u in self.utterances if u["utterance"].strip())


def utterances(timed_caption: object) -> list[dict]:
    """The record's utterances with their times; ValueError when the field is not a list of them."""
    if not isinstance(timed_caption, list) or not timed_caption:
        raise ValueError("timed_caption is not a non-empty list")
    for u in timed_caption:
        if not (
            isinstance(u, dict)
            and isinstance(u.get("utterance"), str)
            and all(isinstance(u.get(k), (int, float)) for k in ("start_time", "end_time"))
            and 0 <= u["start_time"] <= u["end_time"]
        ):
            raise ValueError(f"timed_caption entry {str(u)[:80]} lacks utterance/start_time/end_time")
    return sorted(timed_caption, key=lambda u: u["start_time"])


def narration_windows(timed: list[dict], seconds: float) -> list[Window]:
    """Consecutive utterances grouped while the group spans at most `seconds` (a longer utterance stands alone)."""
    windows: list[list[dict]] = []
    for u in timed:
        if windows and u["end_time"] - windows[-1][0]["start_time"] <= seconds:
            windows[-1].append(u)
        else:
            windows.append([u])
    return [Window(w[0]["start_time"], max(u["end_time"] for u in w), w) for w in windows]


def window_meta(window: Window, traces: object) -> dict:
    """The window's utterance times from its start, and the trace points inside its time span."""
    timed = [
        {
            "utterance": u["utterance"],
            "start_time": round(u["start_time"] - window.start, 3),
            "end_time": round(u["end_time"] - window.start, 3),
        }
        for u in window.utterances
    ]
    meta: dict = {"timed_caption": timed, "window": [window.start, window.end]}
    if isinstance(traces, list):
        meta["traces"] = [
            [p for p in segment if isinstance(p, dict) and window.start <= p.get("t", -1) <= window.end]
            for segment in traces
            if isinstance(segment, list)
        ]
        meta["traces"] = [segment for segment in meta["traces"] if segment]
    return meta


def cut_audio(data: bytes, start: float, end: float) -> bytes:
    """The [start, end] seconds of an audio file, as FLAC."""
    with soundfile.SoundFile(io.BytesIO(data)) as f:
        rate = f.samplerate
        f.seek(min(int(start * rate), max(f.frames - 1, 0)))
        frames = f.read(max(1, int((end - start) * rate)), dtype="float32", always_2d=True)
    out = io.BytesIO()
    soundfile.write(out, frames, rate, format="FLAC")
    return out.getvalue()
