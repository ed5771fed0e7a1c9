"""The audio's log-mel features, computed where the batch is: loader batches carry waveforms, and the frames are
made on the compute device (`opt_ds.data.batch.to_device`), where a GPU makes a batch's filterbank in a few small
kernels; in a loader worker it was 40% of a sample's decode time (BENCHMARKS.md, "Data loader")."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torchaudio

if TYPE_CHECKING:  # opt_ds.data.decode reads waveforms with this module's helpers
    from opt_ds.data.decode import DecodeConfig

PCM16_SCALE = 32768  # libsndfile's scale from 16-bit PCM to floats in [-1, 1)


def float_wave(wave: torch.Tensor) -> torch.Tensor:
    """A decoded waveform as float32 in [-1, 1]; an int16 one (16-bit PCM as stored) scaled as libsndfile scales it,
    so the floats are those of libsndfile's own float read."""
    return wave.float().div_(PCM16_SCALE) if wave.dtype == torch.int16 else wave.float()


def frame_geometry(sample_rate: int) -> tuple[int, int]:
    """(frame length, frame shift) in samples: 25 ms frames every 10 ms."""
    return sample_rate * 25 // 1000, sample_rate * 10 // 1000


class KaldiFbank(torch.nn.Module):
    """Log-mel frames [..., T, n_mels] of mono waveforms [..., N]: `torchaudio.compliance.kaldi.fbank` with 25 ms
    Hann frames every 10 ms, no dither (the AST / AudioSet features), equal to it within float rounding
    (tests/test_data.py). A frame holds whole samples of its clip only (kaldi's snip_edges), so the frames of a
    zero-padded clip up to its own count are the clip's frames.

    kaldi.fbank rebuilds its window and mel matrix for every clip, takes one clip at a time and squares |z|; here
    they are buffers built once, batches go in whole, and the power is re^2 + im^2.
    """

    def __init__(self, sample_rate: int, n_mels: int):
        super().__init__()
        self.frame, self.shift = frame_geometry(sample_rate)
        self.n_fft = 1 << (self.frame - 1).bit_length()  # kaldi's round_to_power_of_two
        banks, _ = torchaudio.compliance.kaldi.get_mel_banks(
            n_mels, self.n_fft, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0
        )
        self.register_buffer("window", torch.hann_window(self.frame, periodic=False), persistent=False)
        banks = torch.nn.functional.pad(banks, (0, 1)).T.contiguous()  # [n_fft / 2 + 1, n_mels]
        self.register_buffer("banks", banks, persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        frames = wave.unfold(-1, self.frame, self.shift)
        frames = frames - frames.mean(dim=-1, keepdim=True)
        emphasised = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1).mul_(-0.97).add_(frames)
        spectrum = torch.fft.rfft(emphasised.mul_(self.window), n=self.n_fft)
        power = spectrum.real.square() + spectrum.imag.square()
        return (power @ self.banks).clamp_min(torch.finfo(power.dtype).eps).log()


def frame_count(samples: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Log-mel frames of waveforms of `samples` samples (0 for fewer than one frame)."""
    frame, shift = frame_geometry(sample_rate)
    return torch.where(samples >= frame, 1 + (samples - frame).div(shift, rounding_mode="floor"), 0)


def samples_for_frames(frames: int, sample_rate: int) -> int:
    """The fewest waveform samples that make `frames` frames."""
    frame, shift = frame_geometry(sample_rate)
    return frame + (frames - 1) * shift


@lru_cache(maxsize=8)
def _fbank_on(device: torch.device, sample_rate: int, n_mels: int) -> KaldiFbank:
    return KaldiFbank(sample_rate, n_mels).to(device)


def with_log_mel(batch: dict, decode: DecodeConfig) -> dict:
    """The batch with its `waveform` [B, N] (int16 or float32) replaced by `audio` [B, T, n_mels]: normalised
    log-mel frames made on the waveform's device in float32, zero where `audio_mask` [B, T] (set by the collate) is
    False."""
    batch = dict(batch)
    wave = batch.pop("waveform")
    fbank = _fbank_on(wave.device, decode.sample_rate, decode.n_mels)
    frames = (fbank(float_wave(wave)) - decode.fbank_mean) / (2 * decode.fbank_std)
    batch["audio"] = frames.mul_(batch["audio_mask"].to(wave.device)[..., None])
    return batch
