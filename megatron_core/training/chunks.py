"""Model chunks of the interleaved pipeline (virtual pipeline parallelism) as one module for the Trainer.

Under ``virtual_pipeline_model_parallel_size = v`` every pipeline rank holds ``v`` chunks of the
layer stack (chunk ``c`` built while the virtual pipeline rank is ``c``). The schedule takes them
as a list; the Trainer's optimizer, gradient clipping and checkpoints take one module.
:class:`ModelChunks` is that module: its parameters and ``state_dict()`` are the chunks' under
``chunks.<c>.``, and its ``sharded_state_dict()`` holds every chunk's sharded tensors under the
same dictionary keys, with their checkpoint keys unchanged (global layer indices, see
``transformer_block``). So a checkpoint written with chunks loads at any other PP / VPP layout, and
one written without them loads into chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_core import parallel_state
from megatron_core.dist_checkpointing.mapping import ShardedStateDict


class ModelChunks(torch.nn.Module):
    """This rank's virtual-pipeline model chunks (``chunks[c]`` = chunk ``c``), seen as one module.

    Args:
        chunks: the chunks, in virtual-pipeline-rank order; each must have ``sharded_state_dict()``.
    """

    def __init__(self, chunks: list[torch.nn.Module]) -> None:
        super().__init__()
        for c, chunk in enumerate(chunks):
            if not hasattr(chunk, "sharded_state_dict"):
                raise TypeError(f"model chunk {c} ({type(chunk).__name__}) has no sharded_state_dict(); "
                                "build chunks from MegatronModule models")
        self.chunks = torch.nn.ModuleList(chunks)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("ModelChunks is not called: the interleaved schedule runs each chunk "
                        "(get_forward_backward_func() with model=list(model_chunks.chunks))")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple[Any, ...] = (),
                           metadata: dict[str, Any] | None = None) -> ShardedStateDict:
        """Every chunk's sharded entries under ``chunks.<c>.<key>`` (checkpoint keys unchanged)."""
        out: ShardedStateDict = {}
        for c, chunk in enumerate(self.chunks):
            entries = chunk.sharded_state_dict(prefix, sharded_offsets, metadata)  # type: ignore[operator]
            out.update({f"chunks.{c}.{key}": entry for key, entry in entries.items()})
        return out


def build_model_chunks(build: Callable[[], torch.nn.Module]) -> list[torch.nn.Module]:
    """``build()`` once per virtual pipeline rank (set while it runs): this rank's chunks.

    Without virtual pipelining: ``[build()]``. Call after ``initialize_model_parallel(...,
    virtual_pipeline_model_parallel_size=v)``; ``build`` reads the stage position (``pre_process`` /
    ``post_process`` from ``is_pipeline_first/last_stage()``) and the layer offset from parallel_state.
    """
    v = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if v is None:
        return [build()]
    chunks = []
    try:
        for c in range(v):
            parallel_state.set_virtual_pipeline_model_parallel_rank(c)
            chunks.append(build())
    finally:
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    return chunks
