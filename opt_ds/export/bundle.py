"""The exported model: one safetensors file holding `model.*` (pre-training) and `image_tokenizer.*`, with
the run's config in its metadata (also written beside it as .yaml), loadable without DeepSpeed. A run with a
concept vocabulary leaves it beside the export too (.concepts.json), where loading finds it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from opt_ds.config.experiment import ExperimentConfig
from opt_ds.config.fields import from_dict, to_dict
from opt_ds.model.config import load_model_config
from opt_ds.model.opt import OPTModel
from opt_ds.model.vqvae import VQVAE
from opt_ds.train import checkpoint
from opt_ds.train.stages import stage_of

CONFIG_KEY = "opt_ds_config"


class Bundle(nn.Module):
    """What an export holds: the OPT model (pre-training exports) and the image tokenizer."""

    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        model_cfg = load_model_config(cfg.model, cfg.model_overrides)
        if stage_of(cfg).exports_model:
            self.model = OPTModel(model_cfg)
        self.image_tokenizer = VQVAE(model_cfg.vq)


def run_config(checkpoint_dir: Path) -> ExperimentConfig:
    config_file = checkpoint_dir.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise checkpoint.CheckpointError(f"{config_file} not found: export needs the run directory's config.yaml")
    return from_dict(ExperimentConfig, yaml.safe_load(config_file.read_text()), where=str(config_file))


def export(checkpoint_path: str, out: str) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = checkpoint.find_resume(Path(checkpoint_path), checkpoint_path)
    cfg = run_config(path)
    bundle = Bundle(cfg)
    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    stage = stage_of(cfg)
    target = stage.exported(bundle)
    missing, unexpected = target.load_state_dict(state, strict=False)
    buffers = {n for n, _ in target.named_buffers()} if stage.restores_buffers else set()
    missing = [k for k in missing if k not in buffers]
    if missing or unexpected:
        raise checkpoint.CheckpointError(
            f"{path}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    stage.finish_export(bundle, path, cfg)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.data.decode.concepts:  # the concept ids mean nothing without their vocabulary: it travels along
        shutil.copyfile(cfg.data.decode.concepts, vocabulary_beside(out_path))
    config_json = json.dumps(to_dict(cfg))
    save_model(
        bundle, str(out_path), metadata={CONFIG_KEY: config_json, "step": str(checkpoint.read_meta(path)["step"])}
    )
    out_path.with_suffix(".yaml").write_text(yaml.safe_dump(json.loads(config_json), sort_keys=False))
    return out_path


def restore_vq_buffers(vq: VQVAE, path: Path) -> None:
    """The VQ-VAE's codebook buffers from a checkpoint's rank-0 module states file."""
    files = sorted(path.glob("*model_states.pt"))
    if not files:
        raise checkpoint.CheckpointError(f"{path}: no model states file with the VQ-VAE codebook")
    states = torch.load(files[0], map_location="cpu", weights_only=True)
    buffers = {k: v for k, v in states["module"].items() if k.startswith("quantizer.")}
    vq.load_state_dict(buffers, strict=False)


def read_config(path: str | Path) -> ExperimentConfig:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path}: not an opt_ds export (no {CONFIG_KEY} metadata)")
    cfg = from_dict(ExperimentConfig, json.loads(meta[CONFIG_KEY]), where=f"{path} metadata")
    vocabulary = vocabulary_beside(Path(path))
    if cfg.data.decode.concepts and vocabulary.is_file():
        cfg = replace(cfg, data=replace(cfg.data, decode=replace(cfg.data.decode, concepts=str(vocabulary))))
    return cfg


def vocabulary_beside(export_path: Path) -> Path:
    """Where an export keeps the concept vocabulary of its run (model.safetensors -> model.concepts.json)."""
    return export_path.with_suffix(".concepts.json")


def load_bundle(path: str | Path) -> tuple[Bundle, ExperimentConfig]:
    cfg = read_config(path)
    bundle = Bundle(cfg)
    load_model(bundle, str(path), strict=True)
    return bundle.eval(), cfg


def load_bundle_part(module: nn.Module, path: str | Path, prefix: str) -> None:
    """Load one part of an export (e.g. the image tokenizer into a VQVAE)."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = {k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: holds no '{prefix}*' weights")
    module.load_state_dict(state, strict=True)
