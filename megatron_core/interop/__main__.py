"""Bring checkpoints in and out: ``python -m megatron_core.interop COMMAND``.

    python -m megatron_core.interop import-hf HF_DIR CKPT_DIR [--dtype bf16]
    python -m megatron_core.interop export-hf CKPT_DIR OUT_DIR [--dtype bf16] [--max-shard-size 2GB] [--config run.yaml]
    python -m megatron_core.interop import-mcore MCORE_CKPT_DIR CKPT_DIR [--config run.yaml]

Checkpoints written here record their model (family, TransformerConfig, spec, model arguments), so
they load at any TP/PP with no further arguments (``megatron_core.interop.load_checkpoint``).
Everything runs in one CPU process.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence

from megatron_core import cli
from megatron_core.dist_checkpointing.errors import CheckpointingError
from megatron_core.interop.registry import HFInteropError


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m megatron_core.interop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="Hugging Face directory (config.json + safetensors) -> our checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("checkpoint_dir")
    imp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                     help="store weights in this dtype (default: as in the files)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at CHECKPOINT_DIR")
    exp = sub.add_parser("export-hf", help="our checkpoint -> Hugging Face directory (from_pretrained loads it)")
    exp.add_argument("checkpoint_dir")
    exp.add_argument("out_dir")
    exp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                     help="write weights in this dtype (default: the checkpoint's)")
    exp.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 500MB, 2GB (default 2GB)")
    exp.add_argument("--config", default=None, help="run YAML, when the checkpoint does not describe its model")
    exp.add_argument("--family", default=None, help="Hugging Face model_type, when it cannot be inferred")
    mc = sub.add_parser("import-mcore", help="Megatron-Core torch_dist checkpoint -> our checkpoint (no Megatron needed)")
    mc.add_argument("mcore_checkpoint_dir")
    mc.add_argument("checkpoint_dir")
    mc.add_argument("--config", default=None, help="run YAML describing the model, when the checkpoint stores no args")
    mc.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at CHECKPOINT_DIR")
    return parser


def bound_malloc_cache() -> None:
    """Let glibc return freed tensors to the system at once.

    glibc raises its mmap threshold each time a large block is freed, after which tensors of that
    size come from the heap and stay resident once freed: converting tensor by tensor then grows
    to about the model's size (measured: 154 MiB above baseline for a 112 MiB model, 32 MiB with
    the threshold fixed at 64 KiB). Nothing happens where glibc is absent.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD; also stops its dynamic growth
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bound_malloc_cache()
    if args.command == "import-mcore":
        from megatron_core.interop.mcore_import import import_mcore

        import_mcore(args.mcore_checkpoint_dir, args.checkpoint_dir, config=args.config, overwrite=args.overwrite)
    elif args.command == "import-hf":
        from megatron_core.interop.hf_dir import import_hf

        import_hf(args.hf_dir, args.checkpoint_dir, dtype=args.dtype, overwrite=args.overwrite)
    else:
        from megatron_core.interop.hf_export import export_hf

        export_hf(args.checkpoint_dir, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                  config=args.config, family=args.family)
    return 0


if __name__ == "__main__":
    cli.run(main, user_errors=(HFInteropError, CheckpointingError))
