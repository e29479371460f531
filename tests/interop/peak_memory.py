"""Peak anonymous memory of one interop CLI command, measured in a fresh interpreter.

A warm-up command first (imports, registries, tensorstore's pools), then anonymous resident memory
(heap, not the page cache of memory-mapped files) is sampled every 2 ms while the measured command
runs through the CLI (which also bounds malloc's cache).
"""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = r"""
import json, sys, threading, time
from megatron_core.interop.__main__ import main

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

warmup, measured = json.loads(sys.argv[1]), json.loads(sys.argv[2])
peak, done = [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

main(warmup)
baseline = anon()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
main(measured)
done.append(1)
thread.join()
print(json.dumps({"baseline": baseline, "peak": max(peak[0], anon())}))
"""


def cli_peak_memory_above_baseline(warmup: list[str], measured: list[str], timeout: float = 300) -> int:
    """Bytes of anonymous memory ``python -m megatron_core.interop *measured`` adds at its peak."""
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(warmup), json.dumps(measured)],
                         capture_output=True, text=True, check=True, timeout=timeout)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return int(result["peak"] - result["baseline"])
