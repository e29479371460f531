"""A CPU reference of the slice of Transformer Engine's PyTorch API that our TE wrappers call.

NOT Transformer Engine: plain-PyTorch maths behind TE's documented constructor arguments,
parameter names (``weight``, ``bias``, ``layer_norm_weight``, ``layer_norm_bias``), return
conventions (``return_bias``), tensor-parallel modes (``parallel_mode`` "column"/"row") and
``_extra_state``. Tests put it on ``sys.path`` to exercise the wrappers' wiring, sharding and
checkpoint interchange on CPU; TE's own kernels are checked against the local spec in
``tests/gpu`` on a real GPU.
"""

__version__ = "0.0.0+cpu-reference"
