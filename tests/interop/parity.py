"""Shared checks of the Hugging Face parity tests: logits both ways and exact state-dict round trips."""

from __future__ import annotations

import torch

from megatron_core.interop import from_hf, to_hf

MAX_ABS_DIFF = 1e-5  # fp32 logits
BATCH, SEQ = 2, 12

#: Measured max |logits diff| per case, for the final report (pytest -s prints them).
MEASURED: dict[str, float] = {}


def perturb_(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its init (norm weights 1, biases 0) so that no mapping hides."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)
    return model


def batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ))
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    return tokens, positions


def ours_logits(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, positions, None)


def hf_logits(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=positions).logits


def record(case: str, a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{case}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a - b).abs().max().item()
    MEASURED[case] = diff
    print(f"[max-diff] {case}: {diff:.3e}")
    assert diff <= MAX_ABS_DIFF, f"{case}: max |logits diff| = {diff:.3e} > {MAX_ABS_DIFF}"
    return diff


def check_hf_to_ours_and_back(case: str, hf_model: torch.nn.Module, vocab_size: int) -> torch.nn.Module:
    """from_hf logits == HF logits; to_hf(from_hf(m)) state dict == m's, bit for bit; returns ours."""
    hf_model = perturb_(hf_model.eval())
    ours = from_hf(hf_model)
    assert not ours.training
    tokens, positions = batch(vocab_size)
    record(f"{case} from_hf", ours_logits(ours, tokens, positions), hf_logits(hf_model, tokens, positions))

    back = to_hf(ours)
    assert type(back) is type(hf_model)
    want, got = hf_model.state_dict(), back.state_dict()
    assert got.keys() == want.keys(), set(got) ^ set(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), f"{case}: {key} differs after to_hf(from_hf(m))"
    record(f"{case} to_hf(from_hf)", hf_logits(back.eval(), tokens, positions), hf_logits(hf_model, tokens, positions))
    return ours


def check_ours_to_hf(case: str, ours: torch.nn.Module, vocab_size: int, **to_hf_kwargs) -> torch.nn.Module:
    """A model of ours built from a spec (never seen HF) -> to_hf logits equal ours; back again exactly."""
    ours = perturb_(ours.eval())
    hf_model = to_hf(ours, **to_hf_kwargs).eval()
    tokens, positions = batch(vocab_size)
    record(f"{case} to_hf", hf_logits(hf_model, tokens, positions), ours_logits(ours, tokens, positions))
    again = from_hf(hf_model)
    want, got = ours.state_dict(), again.state_dict()
    assert got.keys() == want.keys(), set(got) ^ set(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), f"{case}: {key} differs after from_hf(to_hf(m))"
    return hf_model
