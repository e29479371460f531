"""ModuleSpec / build_module: class, function and dotted-path specs, nesting, Protocol checks, YAML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pytest
import torch

from megatron_core.transformer.enums import AttnMaskType
from megatron_core.transformer.identity_op import IdentityOp
from megatron_core.transformer.spec_utils import (
    ModuleSpec,
    SpecError,
    build_module,
    check_spec,
    format_spec,
    import_by_path,
    spec_from_yaml,
    spec_to_yaml,
)


class ProjBuilder(Protocol):
    def __call__(self, input_size: int, output_size: int, /, *, bias: bool, scale: float) -> torch.nn.Module: ...


class Proj(torch.nn.Module):
    def __init__(self, input_size: int, output_size: int, /, *, bias: bool, scale: float = 1.0) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(input_size, output_size, bias=bias)
        self.scale = scale

    def forward(self, x):
        return self.linear(x) * self.scale


class ProjMissingScale(torch.nn.Module):
    def __init__(self, input_size: int, output_size: int, /, *, bias: bool) -> None:
        super().__init__()


@dataclass
class BlockSubmodules:
    proj: ModuleSpec | type | ProjBuilder
    norm: ModuleSpec | type = IdentityOp


class Block(torch.nn.Module):
    def __init__(self, width: int, submodules: BlockSubmodules, mask: AttnMaskType = AttnMaskType.causal) -> None:
        super().__init__()
        self.proj = build_module(submodules.proj, width, width, bias=True, scale=2.0)
        self.norm = build_module(submodules.norm, width)
        self.mask = mask

    def forward(self, x):
        return self.norm(self.proj(x))


@dataclass
class ModelSubmodules:
    block: ModuleSpec


class Model(torch.nn.Module):
    def __init__(self, width: int, submodules: ModelSubmodules) -> None:
        super().__init__()
        self.block = build_module(submodules.block, width)


def double(x):
    return 2 * x


def test_class_spec_merges_params_and_kwargs():
    norm = build_module(ModuleSpec(torch.nn.LayerNorm, params={"eps": 1e-3}), 8)
    assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-3 and norm.normalized_shape == (8,)


def test_bare_class_and_function_specs():
    assert isinstance(build_module(torch.nn.ReLU), torch.nn.ReLU)
    assert build_module(ModuleSpec(double)) is double
    assert build_module(double) is double


def test_dotted_path_spec():
    relu = build_module(ModuleSpec("torch.nn.ReLU"))
    assert isinstance(relu, torch.nn.ReLU)
    assert import_by_path("torch.nn.functional.gelu") is torch.nn.functional.gelu
    with pytest.raises(SpecError, match="no_such_module"):
        build_module(ModuleSpec("no_such_module.Thing"))


def test_nested_submodules_build():
    spec = ModuleSpec(Model, submodules=ModelSubmodules(
        block=ModuleSpec(Block, submodules=BlockSubmodules(proj=Proj, norm=ModuleSpec(torch.nn.LayerNorm)))))
    model = build_module(spec, 4)
    assert isinstance(model.block.proj, Proj) and model.block.proj.scale == 2.0
    assert isinstance(model.block.norm, torch.nn.LayerNorm)
    assert model.block(torch.ones(3, 4)).shape == (3, 4)


def test_protocol_mismatch_names_slot_path_and_parameter():
    spec = ModuleSpec(Block, submodules=BlockSubmodules(proj=ProjMissingScale))
    with pytest.raises(SpecError) as info:
        check_spec(spec, "decoder.layers")
    message = str(info.value)
    assert "decoder.layers.proj" in message
    assert "ProjMissingScale" in message
    assert "scale" in message
    # build_module runs the same check before calling the constructor.
    with pytest.raises(SpecError, match="ProjMissingScale"):
        build_module(spec, 4)


def test_protocol_check_counts_spec_params():
    # A module lacking `scale` in its signature still fails even if params try to supply it.
    ok = ModuleSpec(Block, submodules=BlockSubmodules(proj=ModuleSpec(Proj, params={"scale": 3.0})))
    check_spec(ok, "x")


def test_yaml_round_trip_builds_the_same_model():
    spec = ModuleSpec(Model, submodules=ModelSubmodules(
        block=ModuleSpec(Block, params={"mask": AttnMaskType.padding},
                         submodules=BlockSubmodules(proj=Proj, norm=ModuleSpec("torch.nn.LayerNorm")))))
    text = spec_to_yaml(spec)
    assert "tests.transformer.test_spec_utils.Block" in text
    back = spec_from_yaml(text)
    torch.manual_seed(0)
    a = build_module(spec, 4)
    torch.manual_seed(0)
    b = build_module(back, 4)
    assert b.block.mask is AttnMaskType.padding
    x = torch.randn(2, 4)
    torch.testing.assert_close(a.block(x), b.block(x), rtol=0, atol=0)


def test_spec_prints_as_tree():
    spec = ModuleSpec(Block, submodules=BlockSubmodules(proj=Proj))
    text = format_spec(spec)
    assert text.splitlines()[0] == "Block"
    assert "  proj: Proj" in text and "  norm: IdentityOp" in text
