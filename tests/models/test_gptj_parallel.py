"""GPT-J (parallel attention + MLP, partial interleaved rotary, biased head) at TP=2 equals TP=1; reshards 2 <-> 1."""

from __future__ import annotations

from tests.models.zoo_harness import check_case


def test_gptj_tensor_parallel_parity_and_resharding(tmp_path):
    check_case("gptj", tmp_path)
