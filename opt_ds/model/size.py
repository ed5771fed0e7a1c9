"""Parameters and FLOPs of a ModelConfig, computed analytically (no weights allocated).

FLOPs count multiply-adds as 2 and cover matmuls, convolutions and attention scores; norms, softmax
and embeddings lookups are ignored. A training step costs 3x the forward FLOPs of what it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from opt_ds.model.config import FRAMES_PER_AUDIO_TOKEN, ModelConfig, VisionConfig, subsampled_length
from opt_ds.model.heads import MATCH_CLASSES


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _block_params(dim: int, mlp_ratio: float, memory_dim: int | None = None) -> int:
    hidden = int(dim * mlp_ratio)
    params = 2 * dim + _linear(dim, 3 * dim) + _linear(dim, dim) + 2 * dim + _linear(dim, hidden) + _linear(hidden, dim)
    if memory_dim is not None:
        params += 2 * dim + _linear(dim, dim) + _linear(memory_dim, 2 * dim) + _linear(dim, dim)
    return params


def _block_flops(dim: int, mlp_ratio: float, length: int, memory: tuple[int, int] | None = None) -> int:
    """Forward FLOPs of one block on `length` tokens; memory = (memory_length, memory_dim)."""
    hidden = int(dim * mlp_ratio)
    flops = 2 * length * (3 * dim * dim + dim * dim + 2 * dim * hidden) + 4 * length * length * dim
    if memory is not None:
        mem_len, mem_dim = memory
        flops += 2 * length * 2 * dim * dim + 2 * mem_len * mem_dim * 2 * dim + 4 * length * mem_len * dim
    return flops


def _vision_stem(v: VisionConfig) -> tuple[int, int]:
    """(parameters, forward FLOPs per image) of the patch embedding: one linear map per patch, or timm's ConvStem
    (stride-2 3x3 convolutions widening to `hidden`, BatchNorm on all but the last, bias on the last only)."""
    if v.stem == "patch":
        return _linear(3 * v.patch_size**2, v.hidden), 2 * v.grid**2 * 3 * v.patch_size**2 * v.hidden
    depth = v.patch_size.bit_length() - 1
    widths = [3] + [v.hidden // 2**i for i in reversed(range(depth))]
    params, flops = widths[-1], 0
    for layer, (c_in, c_out) in enumerate(zip(widths, widths[1:]), start=1):
        params += 9 * c_in * c_out + (2 * c_out if layer < depth else 0)
        flops += 2 * (v.image_size // 2**layer) ** 2 * 9 * c_in * c_out
    return params, flops


@dataclass(frozen=True)
class Lengths:
    """Token counts per component for one sample."""

    text: int
    image: int
    audio: int
    concepts: int = 0  # concept slots beside the text tokens, tag slots beside the patches (concept inputs only)
    tags: int = 0

    @property
    def fusion(self) -> int:
        return 1 + self.text + self.image + self.audio


def lengths_for(
    cfg: ModelConfig,
    text_tokens: int | None = None,
    audio_frames: int | None = None,
    concept_slots: tuple[int, int] = (0, 0),
) -> Lengths:
    """Defaults: the configured maxima (text.max_len tokens, audio.max_frames frames), no concept slots."""
    text = cfg.text.max_len if text_tokens is None else text_tokens
    frames = cfg.audio.max_frames if audio_frames is None else min(audio_frames, cfg.audio.max_frames)
    concepts, tags = concept_slots if cfg.concept_vocab_size else (0, 0)
    return Lengths(text, cfg.vision.grid**2 + 1, subsampled_length(frames) + 1, concepts, tags)


def parameter_count(cfg: ModelConfig) -> dict[str, int]:
    t, v, a, f = cfg.text, cfg.vision, cfg.audio, cfg.fusion
    text = (
        (t.vocab_size + t.max_len + 2) * t.hidden
        + 2 * t.hidden
        + t.layers
        * (
            4 * _linear(t.hidden, t.hidden)
            + _linear(t.hidden, t.intermediate)
            + _linear(t.intermediate, t.hidden)
            + 4 * t.hidden
        )
    )
    vision = (
        _vision_stem(v)[0] + (v.grid**2 + 3) * v.hidden + v.layers * _block_params(v.hidden, v.mlp_ratio) + 2 * v.hidden
    )
    c = a.conv_channels
    audio = (
        _linear(9, c)
        + _linear(9 * c, c)
        + _linear(c * subsampled_length(a.n_mels), a.hidden)
        + (a.max_tokens + 3) * a.hidden
        + a.layers * _block_params(a.hidden, a.mlp_ratio)
        + 2 * a.hidden
    )
    fusion = (
        _linear(t.hidden, f.hidden)
        + _linear(v.hidden, f.hidden)
        + _linear(a.hidden, f.hidden)
        + 4 * f.hidden
        + f.layers * _block_params(f.hidden, f.mlp_ratio)
        + 2 * f.hidden
    )

    def decoder(d, vocab: int, max_len: int) -> int:
        return (vocab + max_len) * d.hidden + d.layers * _block_params(d.hidden, d.mlp_ratio, f.hidden) + 2 * d.hidden

    heads = (
        _linear(f.hidden, t.hidden)
        + 2 * t.hidden
        + t.vocab_size  # MLM (decoder weight tied to text)
        + 2 * f.hidden
        + _linear(f.hidden, cfg.vq.codebook_size)  # MVM
        + 2 * f.hidden
        + _linear(f.hidden, FRAMES_PER_AUDIO_TOKEN * a.n_mels)  # MAM
        + _linear(f.hidden, f.hidden)
        + _linear(f.hidden, MATCH_CLASSES)  # matching
        + _linear(f.hidden, f.hidden)
        + _linear(f.hidden, 2)  # matching against hard negatives
        + sum(_linear(d, cfg.contrastive_dim) for d in (t.hidden, v.hidden, a.hidden))
        + 1
    )  # contrastive
    concepts = cfg.concept_vocab_size
    if concepts:  # the shared embedding (text), the tags' projection (vision), recovery and grounding heads
        text += concepts * t.hidden
        vision += _linear(t.hidden, v.hidden) + v.hidden
        heads += sum(2 * d + _linear(d, concepts) + _linear(d, f.hidden) for d in (t.hidden, v.hidden)) + 1
    counts = {
        "text": text,
        "vision": vision,
        "audio": audio,
        "fusion": fusion,
        "text_decoder": decoder(cfg.text_decoder, t.vocab_size, t.max_len),
        "image_decoder": decoder(cfg.image_decoder, cfg.vq.codebook_size + 1, v.grid**2),
        "heads": heads,
    }
    counts["total"] = sum(counts.values())
    return counts


def forward_flops(cfg: ModelConfig, lengths: Lengths | None = None) -> dict[str, int]:
    """Forward FLOPs per sample of each component (heads: all of them once)."""
    n = lengths or lengths_for(cfg)
    t, v, a, f = cfg.text, cfg.vision, cfg.audio, cfg.fusion
    words = n.text + n.concepts
    text = t.layers * (2 * words * (4 * t.hidden**2 + 2 * t.hidden * t.intermediate) + 4 * words**2 * t.hidden)
    patches = v.grid**2
    vision = (
        _vision_stem(v)[1]
        + 2 * n.tags * t.hidden * v.hidden
        + v.layers * _block_flops(v.hidden, v.mlp_ratio, n.image + n.tags)
    )
    frames = 4 * (n.audio - 1)
    half = (frames - 1) // 2 + 1
    mels_half, mels_quarter = (a.n_mels - 1) // 2 + 1, subsampled_length(a.n_mels)
    c = a.conv_channels
    audio = (
        2 * 9 * c * half * mels_half
        + 2 * 9 * c * c * (n.audio - 1) * mels_quarter
        + 2 * (n.audio - 1) * c * mels_quarter * a.hidden
        + a.layers * _block_flops(a.hidden, a.mlp_ratio, n.audio)
    )
    fusion = 2 * f.hidden * (n.text * t.hidden + n.image * v.hidden + n.audio * a.hidden) + f.layers * _block_flops(
        f.hidden, f.mlp_ratio, n.fusion
    )

    def decoder(d, vocab: int, length: int) -> int:
        return (
            d.layers * _block_flops(d.hidden, d.mlp_ratio, length, (n.fusion, f.hidden)) + 2 * length * d.hidden * vocab
        )

    heads = (
        2 * n.text * (f.hidden * t.hidden + t.hidden * t.vocab_size)
        + 2 * patches * f.hidden * cfg.vq.codebook_size
        + 2 * (n.audio - 1) * f.hidden * FRAMES_PER_AUDIO_TOKEN * a.n_mels
        + 2 * f.hidden * (f.hidden + MATCH_CLASSES)
        + 2 * f.hidden * (f.hidden + 2)
        + 2 * cfg.contrastive_dim * (t.hidden + v.hidden + a.hidden)
        + 2 * (n.concepts * t.hidden + n.tags * v.hidden) * (cfg.concept_vocab_size + f.hidden)
    )
    out = {
        "text": text,
        "vision": vision,
        "audio": audio,
        "fusion": fusion,
        "text_decoder": decoder(cfg.text_decoder, t.vocab_size, n.text),
        "image_decoder": decoder(cfg.image_decoder, cfg.vq.codebook_size + 1, patches),
        "heads": heads,
    }
    out["total"] = sum(out.values())
    return out
