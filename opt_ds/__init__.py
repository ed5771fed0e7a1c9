"""opt_ds: pre-train OPT (image + text + audio) with DeepSpeed ZeRO-3 on WebDataset shards."""

__version__ = "0.1.0"
