"""FP8 fields of TransformerConfig: Megatron-Core's names and defaults, config-only mistakes rejected."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from megatron_core.config import TransformerConfig

SIZES: dict[str, Any] = dict(num_layers=2, hidden_size=32, num_attention_heads=4)


def test_defaults_are_megatron_cores() -> None:
    config = TransformerConfig(**SIZES)
    assert (config.fp8, config.fp8_recipe, config.fp8_margin, config.fp8_amax_history_len,
            config.fp8_amax_compute_algo) == (None, "delayed", 0, 1, "most_recent")


@pytest.mark.parametrize("fp8", ["e4m3", "hybrid"])
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8", "blockwise"])
def test_every_format_and_recipe_is_accepted_and_round_trips(fp8: str, recipe: str) -> None:
    config = TransformerConfig(**SIZES, fp8=fp8, fp8_recipe=recipe)
    again = TransformerConfig.from_yaml(config.to_yaml())
    assert (again.fp8, again.fp8_recipe) == (fp8, recipe)


@pytest.mark.parametrize(("overrides", "field"), [
    (dict(fp8_amax_history_len=0), "fp8_amax_history_len=0"),
    (dict(fp8="hybrid", fp8_margin=-1), "fp8_margin=-1"),
    (dict(fp8="hybrid", fp8_recipe="mxfp8", fp8_amax_history_len=1024), "fp8_amax_history_len=1024"),
    (dict(fp8="e4m3", fp8_recipe="tensorwise", fp8_amax_compute_algo="max"), "fp8_amax_compute_algo='max'"),
    (dict(fp8="e4m3", fp8_recipe="blockwise", fp8_margin=2), "fp8_margin=2"),
])
def test_config_mistakes_name_the_field_and_the_fix(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match="Fix:") as err:
        TransformerConfig(**SIZES, **overrides)
    assert field in str(err.value)


@pytest.mark.parametrize("overrides", [dict(fp8="e5m2"), dict(fp8_recipe="nvfp4"), dict(fp8_amax_compute_algo="mean")])
def test_unknown_choices_are_rejected(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        TransformerConfig(**SIZES, **overrides)


def test_delayed_settings_are_free_with_the_delayed_recipe() -> None:
    config = TransformerConfig(**SIZES, fp8="hybrid", fp8_margin=1, fp8_amax_history_len=1024,
                               fp8_amax_compute_algo="max")
    assert (config.fp8_margin, config.fp8_amax_history_len, config.fp8_amax_compute_algo) == (1, 1024, "max")
