"""Regional ``torch.compile``: each ``TransformerLayer`` compiled on its own (as torchtitan does).

Compiling layer by layer instead of the whole model keeps compile time to one graph per distinct
layer (the layers share code, so dynamo reuses the compiled graph: compile time does not grow with
depth), leaves the embedding, the fused output loss, the pipeline schedule and the optimizer eager,
and keeps the module tree (and so checkpoint keys) unchanged: ``nn.Module.compile`` compiles the
module's forward in place.

Tensor parallelism: our TP collectives are ``torch.distributed`` calls inside autograd functions
(``tensor_parallel.mappings``); dynamo does not trace them and breaks the graph there, so each
layer compiles into a few graphs around its all-reduces / all-gathers, which stay eager (no
functional collectives). Measured losses equal eager within 1e-5 (``tests/training/test_compile.py``,
TP=1 and TP=2).
"""

from __future__ import annotations

import logging

import torch

from megatron_core.transformer.transformer_layer import TransformerLayer

logger = logging.getLogger(__name__)


def compile_layers(model: torch.nn.Module, **compile_kwargs: object) -> int:
    """Compile every ``TransformerLayer`` of ``model`` in place with ``torch.compile``.

    Args:
        model: any model holding ``TransformerLayer`` modules (GPT, BERT, T5...).
        compile_kwargs: passed to ``torch.compile`` (e.g. ``mode="max-autotune"``).

    Returns:
        The number of layers compiled (compilation itself happens at their first forward).

    Raises:
        ValueError: the model has no ``TransformerLayer`` to compile.
    """
    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    if not layers:
        raise ValueError(
            f"compile_layers: {type(model).__name__} has no TransformerLayer to compile; "
            "Fix: build it from a layer spec, or compile it yourself with torch.compile(model)."
        )
    for layer in layers:
        layer.compile(**compile_kwargs)  # type: ignore[arg-type]
    logger.info("compile: %d TransformerLayer(s) marked for torch.compile (compiled at their first call)",
                len(layers))
    return len(layers)
