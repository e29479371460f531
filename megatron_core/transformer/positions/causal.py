"""The one causal-mask helper: which keys a query may see, by position.

Masks are boolean with True = masked out (Megatron-Core's convention), ``[sq, sk]``.

Alignment matters only when ``sq != sk``:

* ``"bottom_right"`` (the default): the queries are the *last* ``sq`` of the ``sk`` key positions,
  so query ``i`` sees keys ``j <= i + (sk - sq)``. This is what a KV cache needs (a decoding step's
  queries follow the cached keys), and what FlashAttention >= 2.1 and Transformer Engine's
  ``causal_bottom_right`` do. The attention cores (local and TE) use it.
* ``"top_left"``: query ``i`` sees keys ``j <= i``, as ``torch.nn.functional.scaled_dot_product_attention``
  with ``is_causal=True`` and ``torch.nn.Transformer.generate_square_subsequent_mask`` do. The
  ``torch.nn``-style facade (``megatron_core.nn``) uses it, to behave as torch does.

With ``sq == sk`` both are the usual lower-triangular mask. Row ``i`` of a bottom-right mask with
``sq > sk`` may be all True (the query precedes every key); the cores then return zeros there.
"""

from __future__ import annotations

from typing import Literal

import torch

CausalAlignment = Literal["bottom_right", "top_left"]


def causal_mask(
    sq: int, sk: int, device: torch.device | None = None, alignment: CausalAlignment = "bottom_right"
) -> torch.Tensor:
    """Boolean ``[sq, sk]`` mask, True where key ``j`` lies in the future of query ``i``.

    Args:
        sq: number of queries.
        sk: number of keys.
        device: where to build the mask.
        alignment: ``"bottom_right"`` (queries are the last ``sq`` positions; KV cache) or
            ``"top_left"`` (queries are the first ``sq`` positions; torch's ``is_causal``).
    """
    if alignment == "bottom_right":
        shift = sk - sq
    elif alignment == "top_left":
        shift = 0
    else:
        raise ValueError(f"causal_mask alignment={alignment!r}; use 'bottom_right' or 'top_left'")
    rows = torch.arange(sq, device=device)[:, None] + shift
    cols = torch.arange(sk, device=device)[None, :]
    return cols > rows
