"""Build, at set-up, the DeepSpeed ops opt_ds uses on this machine: `python -m opt_ds.ops`.

DeepSpeed compiles its ops on first use (1-3 min each on a small machine), inside the first training run
or test that needs them: the CPU all-reduce, CPU Adam for optimizer offload, and async I/O for NVMe offload.
The builds land in TORCH_EXTENSIONS_DIR; ops the accelerator does not have are skipped.
"""

from __future__ import annotations

import sys

OPS = ("ShareMemCommBuilder", "CPUAdamBuilder", "AsyncIOBuilder")


def main() -> int:
    from deepspeed.accelerator import get_accelerator

    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if (
            builder is None
            or type(builder).__name__ == "NotImplementedBuilder"
            or not builder.is_compatible(verbose=False)
        ):
            print(f"{name}: not available on {get_accelerator().device_name()}, skipped")
            continue
        builder.load(verbose=False)
        print(f"{name}: built")
    return 0


if __name__ == "__main__":
    sys.exit(main())
