"""DeepSpeed: the JSON config filled in from the experiment (`config`), the engine, optimizer and LR schedule
(`engine`), and the patches of DeepSpeed internals, each pinned to the versions it was verified on (`patches`)."""
