"""The three uni-modal encoders: BERT (transformers), ViT (timm) and a log-mel audio transformer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn
from transformers import BertConfig, BertModel

from opt_ds.model.config import FRAMES_PER_AUDIO_TOKEN, AudioConfig, TextConfig, VisionConfig, subsampled_length
from opt_ds.model.layers import Transformer, key_padding_mask, run_blocks

# no dropout in any tower: large-data pre-training does without, and it keeps steps reproducible on resume
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@dataclass
class Level:
    """MVP's second level of a modality: embedded concept slots [B, K, D] and which of them are filled [B, K]."""

    tokens: torch.Tensor
    valid: torch.Tensor


def resolve_text_checkpoint(init_from: str) -> Path:
    if init_from == "minilm":
        from opt_ds.data.tokenizer import default_tokenizer_dir

        return default_tokenizer_dir()
    path = Path(init_from)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text.init_from: {path} is not a local transformers checkpoint (no config.json)")
    return path


def mean_pool(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, L, D] tokens, [B, L] validity -> [B, D]: the mean of each row's real tokens (0 for a row without any).

    The text embedding of the contrastive task. A 2-layer BERT's [CLS] output aligned with pictures at about
    0.7x the R@1 of the same tower mean-pooled (BENCHMARKS.md, "the text pooling"), and sentence-embedding BERTs
    such as all-MiniLM-L6-v2 (`text.init_from: minilm`) were trained mean-pooled.
    """
    weights = valid.to(torch.float32)[..., None]
    summed = (tokens.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return summed.to(tokens.dtype)


class TextEncoder(nn.Module):
    """BERT without pooler: every token's output; `mean_pool` makes the text embedding."""

    def __init__(self, cfg: TextConfig, use_checkpoint: bool = False):
        super().__init__()
        if cfg.init_from:
            path = resolve_text_checkpoint(cfg.init_from)
            self.bert = BertModel.from_pretrained(
                str(path), add_pooling_layer=False, local_files_only=True, attn_implementation="sdpa", **NO_DROPOUT
            )
            got = self.bert.config
            if (got.hidden_size, got.num_hidden_layers, got.vocab_size) != (cfg.hidden, cfg.layers, cfg.vocab_size):
                raise ValueError(
                    f"text.init_from {path}: checkpoint has hidden={got.hidden_size} layers={got.num_hidden_layers} "
                    f"vocab={got.vocab_size}; the config says hidden={cfg.hidden} layers={cfg.layers} "
                    f"vocab={cfg.vocab_size}"
                )
        else:
            bert_cfg = BertConfig(
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden,
                num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads,
                intermediate_size=cfg.intermediate,
                max_position_embeddings=cfg.max_len,
                attn_implementation="sdpa",
                **NO_DROPOUT,
            )
            self.bert = BertModel._from_config(bert_cfg, add_pooling_layer=False)  # ZeRO-3-aware init path
        if use_checkpoint:
            self.bert.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def forward(self, ids: torch.Tensor, valid: torch.Tensor, concepts: Level | None = None) -> torch.Tensor:
        """-> every token's output [B, L, Dt], then (given MVP's concepts [B, K, Dt]) every concept slot's [B, K, Dt].

        Concepts are BERT's second segment: token type 1, all at position 0 (a set, not a sequence).
        """
        # a sample without text still attends to its first (padding) token: no all-masked rows, no NaN
        first = torch.zeros_like(valid)
        first[:, 0] = True
        if concepts is None:
            return self.bert(input_ids=ids, attention_mask=(valid | first).long()).last_hidden_state
        words = self.word_embeddings(ids)
        batch, length, slots = ids.shape[0], ids.shape[1], concepts.tokens.shape[1]
        types = torch.cat([torch.zeros_like(ids), torch.ones(batch, slots, dtype=ids.dtype, device=ids.device)], 1)
        positions = torch.cat([torch.arange(length, device=ids.device), torch.zeros(slots, device=ids.device)])
        return self.bert(
            inputs_embeds=torch.cat([words, concepts.tokens.to(words.dtype)], 1),
            token_type_ids=types,
            position_ids=positions.long()[None].expand(batch, -1),
            attention_mask=torch.cat([valid | first, concepts.valid], 1).long(),
        ).last_hidden_state


class ConvPatchEmbed(nn.Module):
    """timm's ConvStem (stride-2 3x3 convolutions with BatchNorm and ReLU, widening to `hidden`) as the patch
    embedding: [B,3,H,W] -> [B, grid*grid, hidden]. A convolutional start gives a small tower the local features
    a patch projection must learn: after 300 contrastive steps on the synthetic shapes, tiny's tower reads the
    count linearly for 0.90-0.98 of held-out pictures against 0.67-0.78 (BENCHMARKS.md, three seeds each)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        depth = cfg.patch_size.bit_length() - 1
        self.stem = ConvStem(3, depth=depth, channels=cfg.hidden, stride=(2,) * depth)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stem(images).flatten(2).transpose(1, 2)


class VisionEncoder(nn.Module):
    """timm ViT pieces (patch embedding, blocks, norm) with CLS/position/mask tokens owned here.

    Parameter names follow timm's VisionTransformer, so a timm ViT state dict loads directly (stem "patch").
    """

    def __init__(self, cfg: VisionConfig, use_checkpoint: bool = False, concept_dim: int = 0):
        super().__init__()
        vit = VisionTransformer(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.hidden,
            depth=cfg.layers,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            num_classes=0,
            class_token=False,
            pos_embed="none",
            global_pool="",
        )
        self.patch_embed = vit.patch_embed if cfg.stem == "patch" else ConvPatchEmbed(cfg)
        self.blocks, self.norm = vit.blocks, vit.norm
        self.patch_size = cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.grid**2 + 1, cfg.hidden) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
        if concept_dim:  # the picture's object tags, embedded by the shared concept embedding, as extra tokens
            self.tag_proj = nn.Linear(concept_dim, cfg.hidden)
            self.tag_type = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
        self.use_checkpoint = use_checkpoint
        if cfg.init_from:
            self.load_timm_weights(cfg.init_from)

    def load_timm_weights(self, path: str) -> None:
        from opt_ds.model.weights import load_state_dict_file

        state = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith(("head.", "fc_norm."))}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in ("mask_token", "tag_proj.weight", "tag_proj.bias", "tag_type")]
        if missing or unexpected:
            raise ValueError(f"vision.init_from {path}: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def forward(
        self, images: torch.Tensor, patch_mask: torch.Tensor | None = None, tags: Level | None = None
    ) -> torch.Tensor:
        """images [B,3,H,W] -> tokens [B, 1+N, D], then (given tags [B, K, Dc]) the tag slots' [B, K, D].

        Patches where patch_mask [B,N] is True are hidden twice: their pixels are zeroed (the normalised mean)
        before the stem, whose convolutions would otherwise carry a masked patch's border into its neighbours'
        tokens, and their tokens become the mask token after it."""
        if patch_mask is not None:
            pixel_mask = patch_mask.view(
                -1, 1, images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
            )
            pixel_mask = pixel_mask.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)
            images = images.masked_fill(pixel_mask, 0.0)
        x = self.patch_embed(images)
        if patch_mask is not None:
            x = torch.where(patch_mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed.to(x.dtype)
        if tags is None:
            return self.norm(run_blocks(self.blocks, x, self.use_checkpoint))
        tag_tokens = self.tag_proj(tags.tokens.to(x.dtype)) + self.tag_type.to(x.dtype)
        valid = torch.cat([torch.ones(x.shape[:2], dtype=torch.bool, device=x.device), tags.valid], 1)
        x = torch.cat([x, tag_tokens], 1)
        return self.norm(run_blocks(self.blocks, x, self.use_checkpoint, attn_mask=key_padding_mask(valid)))


class AudioEncoder(nn.Module):
    """Log-mel [B,T,M] -> conv subsampling (4x) -> +positions -> transformer; CLS first."""

    def __init__(self, cfg: AudioConfig, use_checkpoint: bool = False):
        super().__init__()
        self.cfg = cfg
        c = cfg.conv_channels
        self.subsample = nn.Sequential(nn.Conv2d(1, c, 3, 2, 1), nn.GELU(), nn.Conv2d(c, c, 3, 2, 1), nn.GELU())
        self.input_proj = nn.Linear(c * subsampled_length(cfg.n_mels), cfg.hidden)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.max_tokens + 1, cfg.hidden) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
        self.transformer = Transformer(cfg.hidden, cfg.layers, cfg.heads, cfg.mlp_ratio, use_checkpoint=use_checkpoint)

    def forward(
        self, fbank: torch.Tensor, frame_valid: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens [B, 1+T', D] and their validity [B, 1+T'] (CLS always valid).

        token_mask [B, T'] (True = masked for MAM) hides token k's frames 4k..4k+3 twice: they are zeroed (the
        normalised mean) before the conv stem, whose receptive field spans 7 frames, so no unmasked neighbour sees
        a masked token's target frames; and the token itself becomes the mask token after the stem.
        """
        fbank, frame_valid = fbank[:, : self.cfg.max_frames], frame_valid[:, : self.cfg.max_frames]
        if token_mask is not None:
            frame_mask = token_mask.repeat_interleave(FRAMES_PER_AUDIO_TOKEN, dim=1)[:, : fbank.shape[1]]
            fbank = fbank.masked_fill(frame_mask[..., None], 0.0)
        x = self.subsample(fbank.unsqueeze(1))  # [B, C, T', M']
        x = self.input_proj(x.permute(0, 2, 1, 3).flatten(2))
        if token_mask is not None:
            x = torch.where(token_mask[..., None], self.mask_token.to(x.dtype), x)
        token_lengths = subsampled_length(frame_valid.sum(1))
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < token_lengths[:, None]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]].to(x.dtype)
        valid = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        return self.transformer(x, mask=key_padding_mask(valid)), valid
