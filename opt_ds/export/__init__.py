"""The exported model: one safetensors file with the run config in its metadata (`bundle`);
`python -m opt_ds.export` writes it from a ZeRO checkpoint."""
