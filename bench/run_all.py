"""Run every CPU benchmark in turn (what `make bench` does); each prints its own markdown table.

    python bench/run_all.py                    # all CPU benchmarks, quick sizes for the slow ones
    python bench/run_all.py --full             # the README's sizes (context_parallel alone: ~10 min)
    python bench/run_all.py context_parallel   # only the named ones (quick sizes unless --full)

`te_vs_local.py` needs a CUDA GPU with Transformer Engine and is run by hand there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# name -> arguments of the quick run; --full runs each with its own defaults (the README's figures).
CPU_BENCHMARKS: dict[str, list[str]] = {
    "gpt_vs_hf": [],
    "checkpoint_bench": [],
    "pipeline_bubble": [],
    # 16k tokens on CPU take minutes per row: the quick run keeps the CP = 1/2/4 memory rows at short lengths
    "context_parallel": ["--seq", "1024", "2048", "--repeats", "1"],
}


def main(argv: list[str]) -> int:
    full = "--full" in argv
    names = [a for a in argv if a != "--full"] or list(CPU_BENCHMARKS)
    unknown = [n for n in names if n not in CPU_BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(CPU_BENCHMARKS)}", file=sys.stderr)
        return 2
    here = Path(__file__).resolve().parent
    failed = []
    for name in names:
        args = [] if full else CPU_BENCHMARKS[name]
        print(f"\n## {name} {' '.join(args)}\n", flush=True)
        rc = subprocess.call([sys.executable, str(here / f"{name}.py"), *args], cwd=here.parent)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
