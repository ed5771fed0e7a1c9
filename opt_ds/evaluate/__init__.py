"""Evaluation: retrieval, zero-shot and matching (`retrieval`), captioning and image generation (`generation`),
the scorers (`scoring`), the whole suite on a model (`suite`); `python -m opt_ds.evaluate` runs it on an export."""
