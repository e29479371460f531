"""Shared fixtures. Parallel tests use ``megatron_core.testing.run_distributed``."""

from __future__ import annotations

import pytest
import torch

from megatron_core import parallel_state


@pytest.fixture(autouse=True)
def _fresh_parallel_state():
    """Each test starts (and ends) with no model-parallel state and a fixed seed."""
    parallel_state.destroy_model_parallel()
    torch.manual_seed(0)
    yield
    parallel_state.destroy_model_parallel()
