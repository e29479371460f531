"""T5Model (encoder-decoder, relative bias split over heads) at TP=2 equals TP=1, and checkpoints reshard 2 <-> 1.

Cases: T5 v1.0 (relu MLP, tied head scaled by hidden**-0.5) and v1.1 (gated tanh-GELU MLP, whose
fc1 is stored through the swiglu-style factory; untied head), both with a 3-layer encoder and a
2-layer decoder, padded encoder and decoder inputs.
"""

from __future__ import annotations

import pytest

from tests.models.zoo_harness import check_case


@pytest.mark.parametrize("case", ["t5_v1.0_tied", "t5_v1.1_untied"])
def test_t5_tensor_parallel_parity_and_resharding(case, tmp_path):
    check_case(case, tmp_path)
