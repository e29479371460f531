"""Shared fixtures. Parallel tests use ``megatron_core.testing.run_distributed``."""

from __future__ import annotations

import pytest
import torch

from megatron_core import parallel_state
from megatron_core.transformer.moe.moe_utils import MoEAuxLossAutoScaler


@pytest.fixture(autouse=True)
def _fresh_parallel_state():
    """Each test starts (and ends) with no model-parallel state and a fixed seed."""
    parallel_state.destroy_model_parallel()
    torch.manual_seed(0)
    MoEAuxLossAutoScaler.set_loss_scale(1.0)  # the Trainer sets it per step (process-wide, as Megatron-Core)
    yield
    parallel_state.destroy_model_parallel()
