"""Every test under ``tests/gpu`` needs a CUDA GPU and Transformer Engine: marked ``cuda``, skipped otherwise.

Run them on a GPU machine with ``pytest -m cuda tests/gpu -s`` (``-s`` shows the measured figures).
"""

from __future__ import annotations

import pytest

from megatron_core.extensions.te_usability import is_te_usable, te_missing_parts


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = str(config.rootpath / "tests" / "gpu")
    skip = None
    if not is_te_usable():
        reason = "needs a CUDA GPU and Transformer Engine (pip install 'spec-megatron[te]'); missing: " + "; ".join(
            part.split(" (")[0] for part in te_missing_parts()
        )
        skip = pytest.mark.skip(reason=reason)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.cuda)
            if skip is not None:
                item.add_marker(skip)
