#!/usr/bin/env bash
# The GPU half of issue 8 in one go, on a machine with an NVIDIA GPU, CUDA PyTorch and Transformer
# Engine (e.g. an NGC PyTorch container, which ships TE; or `pip install --no-build-isolation
# 'spec-megatron[te]'`). Prints versions, runs tests/gpu (parity + checkpoint interchange) with their
# figures, then the 1.3B TE-vs-local benchmark. Results go to ${OUT:-gpu_checks}/; PYTHON picks the
# interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-gpu_checks}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
"$py" - <<'PY' 2>&1 | tee "$out/versions.txt"
import torch
from megatron_core.extensions.te_usability import te_missing_parts, te_version
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("transformer_engine", te_version(), "missing:", te_missing_parts() or "nothing")
PY
"$py" -m pytest -m cuda tests/gpu -s -q -rs -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
"$py" bench/te_vs_local.py --json "$out/te_vs_local.json" 2>&1 | tee "$out/te_vs_local.txt"
bench_rc=${PIPESTATUS[0]}
# Issue 19's GPU rows: TE in FP8 and the local spec compiled, each against TE bf16 (FP8_FORMAT=none skips FP8).
fp8_args=()
[ "${FP8_FORMAT:-hybrid}" != none ] && fp8_args=(--fp8 "${FP8_FORMAT:-hybrid}" --fp8-recipe "${FP8_RECIPE:-delayed}")
"$py" bench/te_vs_local.py "${fp8_args[@]}" --compile --json "$out/te_vs_local_fp8_compile.json" 2>&1 \
    | tee "$out/te_vs_local_fp8_compile.txt"
bench_rc=$(( bench_rc || PIPESTATUS[0] ))
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
