"""The OPT model library: encoders, cross-modal encoder, decoders, heads, VQ-VAE, sizes and generation."""

from opt_ds.model.config import ModelConfig, load_model_config, model_config_names
from opt_ds.model.opt import OPTModel, parameter_counts

__all__ = ["ModelConfig", "OPTModel", "load_model_config", "model_config_names", "parameter_counts"]
