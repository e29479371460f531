"""BertModel at TP=2 equals TP=1 (MLM + NSP outputs and every gradient), and checkpoints reshard 2 <-> 1 bit-exactly."""

from __future__ import annotations

import pytest

from tests.models.zoo_harness import check_case


@pytest.mark.parametrize("case", ["bert", "bert_prenorm_untied"])
def test_bert_tensor_parallel_parity_and_resharding(case, tmp_path):
    check_case(case, tmp_path)
