"""Generate text from a checkpoint saved by ``megatron_core.train``.

    python -m megatron_core.inference --checkpoint runs/text_gpt --prompt "Once upon" --max-new-tokens 200

The model is rebuilt from the run config stored in the checkpoint and loaded at TP=1 whatever TP it
was trained at. Greedy by default; ``--temperature``, ``--top-k`` and ``--top-p`` sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_core import cli
from megatron_core.data import AlphabetTokenizer, TokenizerError
from megatron_core.dist_checkpointing.errors import CheckpointingError
from megatron_core.inference.generation import generate
from megatron_core.inference.sampling import SamplingParams
from megatron_core.training.run_config import build_tokenizer, model_from_checkpoint


def main(argv: Sequence[str] | None = None) -> str:
    parser = cli.ArgumentParser(prog="python -m megatron_core.inference", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory or a training save_dir")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, run, checkpoint, _ = model_from_checkpoint(args.checkpoint)
    tokenizer = build_tokenizer(run.data)
    # Alphabet samples start with <bos>; in packed text a document starts right after an <eos>.
    start = tokenizer.bos_id if isinstance(tokenizer, AlphabetTokenizer) else tokenizer.eos_id
    prompt = torch.tensor([[start, *tokenizer.encode(args.prompt)]])
    limit = getattr(model, "max_sequence_length", prompt.size(1) + args.max_new_tokens)
    new_tokens = max(0, min(args.max_new_tokens, limit - prompt.size(1)))
    out = generate(model, prompt, new_tokens, SamplingParams(args.temperature, args.top_k, args.top_p),
                   vocab_size=tokenizer.num_real_tokens, eos_id=tokenizer.eos_id, seed=args.seed)
    text = tokenizer.decode(out.new_tokens(prompt.size(1))[0].tolist())
    print(f"[{checkpoint}]\n{args.prompt}{text}")
    return text


if __name__ == "__main__":
    cli.run(main, user_errors=(CheckpointingError, TokenizerError))
