"""TE usability: the check, the message when TE is missing, and the guarded wrapper import."""

from __future__ import annotations

import importlib
import sys

import pytest

from megatron_core.extensions import te_usability
from megatron_core.extensions.te_usability import TEUnavailableError, is_te_usable, require_te
from tests.extensions._fake_te import FAKE_TE_ROOT

pytestmark = pytest.mark.skipif(is_te_usable(), reason="TE is usable on this machine: these tests check its absence")


def _assert_clear_message(message: str) -> None:
    assert "spec-megatron[te]" in message  # the extra to install
    assert "CUDA" in message and "GPU" in message  # the hardware it needs
    assert "get_gpt_layer_local_spec()" in message and "backend='local'" in message  # the alternative


def test_te_is_not_usable_without_gpu_or_te() -> None:
    assert not is_te_usable()
    assert te_usability.te_missing_parts()


def test_require_te_names_what_is_missing_and_the_local_alternative() -> None:
    with pytest.raises(TEUnavailableError) as info:
        require_te("get_gpt_layer_te_spec()")
    message = str(info.value)
    assert message.startswith("get_gpt_layer_te_spec() needs NVIDIA Transformer Engine on a CUDA GPU")
    _assert_clear_message(message)


def test_te_unavailable_error_is_an_import_error() -> None:
    assert issubclass(TEUnavailableError, ImportError)


def test_importing_the_wrappers_without_te_raises_the_clear_error() -> None:
    sys.modules.pop("megatron_core.extensions.transformer_engine", None)
    with pytest.raises(TEUnavailableError) as info:
        importlib.import_module("megatron_core.extensions.transformer_engine")
    assert "megatron_core.extensions.transformer_engine needs NVIDIA Transformer Engine" in str(info.value)
    _assert_clear_message(str(info.value))


def test_installed_te_without_a_gpu_is_not_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in TE (importable, no GPU). Verifies the usability check and its message; not TE itself.

    TE importing is not enough: the message then names only the GPU, not the extra.
    """
    monkeypatch.syspath_prepend(FAKE_TE_ROOT)
    monkeypatch.setattr(te_usability, "cuda_device_count", lambda: 0)
    te_usability.te_import_error.cache_clear()
    try:
        assert te_usability.te_import_error() is None
        assert te_usability.te_version() == "0.0.0+cpu-reference"
        assert not is_te_usable()
        missing = te_usability.te_missing_parts()
        assert any("CUDA GPU" in part for part in missing)
        assert not any("spec-megatron[te]" in part for part in missing)
    finally:
        for name in [n for n in sys.modules if n == "transformer_engine" or n.startswith("transformer_engine.")]:
            del sys.modules[name]
        te_usability.te_import_error.cache_clear()


def test_gpu_present_but_te_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(te_usability, "cuda_device_count", lambda: 1)
    missing = te_usability.te_missing_parts()
    assert len(missing) == 1 and "spec-megatron[te]" in missing[0]
    assert te_usability.te_version() is None
