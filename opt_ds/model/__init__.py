"""The OPT model library: encoders, cross-modal encoder, decoders, heads, VQ-VAE, sizes and generation."""

from opt_ds.model.config import ModelConfig, load_model_config, model_config_names
from opt_ds.model.opt import OPTModel, build_model, parameter_counts

__all__ = ["ModelConfig", "OPTModel", "build_model", "load_model_config", "model_config_names", "parameter_counts"]
