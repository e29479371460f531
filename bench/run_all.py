"""Run every CPU benchmark in turn (what `make bench` does); each prints its own markdown table.

    python bench/run_all.py            # all CPU benchmarks
    python bench/run_all.py gpt_vs_hf  # only the named ones

`te_vs_local.py` needs a CUDA GPU with Transformer Engine and is run by hand there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CPU_BENCHMARKS = ["gpt_vs_hf", "checkpoint_bench", "pipeline_bubble"]


def main(names: list[str]) -> int:
    here = Path(__file__).resolve().parent
    failed = []
    for name in names or CPU_BENCHMARKS:
        print(f"\n## {name}\n", flush=True)
        rc = subprocess.call([sys.executable, str(here / f"{name}.py")], cwd=here.parent)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
