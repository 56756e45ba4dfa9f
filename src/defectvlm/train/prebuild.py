"""Compile DeepSpeed's native ops that training loads at start-up, once, at install time.

On a CPU machine DeepSpeed's communication backend JIT-compiles its shared-memory op the
first time a process initialises it (about 50 s on 2 cores; the result is cached under
torch's extension directory). `make install` runs this module so that the first
`defectvlm train` (and the demo's time budget) does not pay for a dependency's build.
On accelerators whose DeepSpeed build has no such op it does nothing.

    python -m defectvlm.train.prebuild
"""

from __future__ import annotations

import time


def main() -> None:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print("deepspeed: no shared-memory communication op to build on this accelerator")
        return
    start = time.perf_counter()
    builder.load(verbose=False)
    print(f"deepspeed: {builder.absolute_name()} ready ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
