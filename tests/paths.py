"""Paths to data files shipped with the tests."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MCORE_GPT_FIXTURE = FIXTURES / "mcore_gpt_local_spec.pt"
MMIDX_FIXTURES = FIXTURES / "mmidx"
MCORE_TORCH_DIST_FIXTURE = FIXTURES / "mcore_torch_dist_gpt"
MCORE_MOE_FIXTURE = FIXTURES / "mcore_moe_local_spec.pt"
MCORE_TORCH_DIST_MOE_FIXTURE = FIXTURES / "mcore_torch_dist_moe"
MCORE_TORCH_DIST_MOE_MIXED_FIXTURE = FIXTURES / "mcore_torch_dist_moe_mixed"
