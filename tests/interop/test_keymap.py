"""Key tables: placeholder expansion, one-key and streaming conversion, aliases, and every family's table
against the real state-dict keys of both models."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_core.interop import HFInteropError, get_family
from megatron_core.interop.keymap import Alias, KeyRule, KeyTable
from megatron_core.interop.layouts import GATED_FC1, TRANSPOSE, qkv_transforms, unstack_transforms

transformers = pytest.importorskip("transformers")


def _moe_table() -> KeyTable:
    rules = [
        KeyRule("emb.weight", "wte.weight"),
        KeyRule("layers.{layer}.qkv.weight", tuple(f"h.{{layer}}.{x}.weight" for x in "qkv"), *qkv_transforms(2, 1, 2)),
        KeyRule("layers.{layer}.experts.{expert}.fc1.weight", "h.{layer}.experts.gate_up", *unstack_transforms()),
        KeyRule("layers.{layer}.fc2.weight", "h.{layer}.c_proj.weight", *TRANSPOSE),
        Alias("lm_head.weight", "wte.weight", check=True),
    ]
    return KeyTable("toy", rules, {"layer": 2, "expert": 3}, hf_ignore=(".inv_freq",))


def _moe_hf_state_dict() -> dict[str, torch.Tensor]:
    wte = torch.randn(5, 4)
    sd = {"wte.weight": wte, "lm_head.weight": wte.clone(), "h.0.inv_freq": torch.ones(1)}
    for i in range(2):
        sd |= {f"h.{i}.q.weight": torch.randn(4, 4), f"h.{i}.k.weight": torch.randn(2, 4),
               f"h.{i}.v.weight": torch.randn(2, 4), f"h.{i}.experts.gate_up": torch.randn(3, 6, 4),
               f"h.{i}.c_proj.weight": torch.randn(4, 6)}
    return sd


def test_placeholders_repeat_rules_and_expand_inside_groups():
    table = _moe_table()
    group = table.group("h.1.experts.gate_up", "from_hf")
    assert group.ours == tuple(f"layers.1.experts.{e}.fc1.weight" for e in range(3))
    assert table.group("layers.1.experts.2.fc1.weight", "to_hf") is group
    assert table.group("h.0.k.weight", "from_hf").hf == ("h.0.q.weight", "h.0.k.weight", "h.0.v.weight")
    assert len(table.keys("from_hf")) == 1 + 2 * 5 and len(table.keys("to_hf")) == 1 + 2 * (1 + 3 + 1)
    with pytest.raises(HFInteropError, match=r"placeholder \{layer\}.*Fix: pass placeholders"):
        KeyTable("toy", [KeyRule("a.{layer}", "b.{layer}")])
    with pytest.raises(HFInteropError, match="mapped twice"):
        KeyTable("toy", [KeyRule("a", "b"), KeyRule("c", "b")])


def test_whole_conversion_round_trips_and_writes_aliases():
    table, hf = _moe_table(), _moe_hf_state_dict()
    ours = table.from_hf(hf)
    assert torch.equal(ours["layers.0.experts.2.fc1.weight"], hf["h.0.experts.gate_up"][2])
    assert torch.equal(ours["layers.1.fc2.weight"], hf["h.1.c_proj.weight"].t())
    back = table.to_hf(ours)
    assert back.keys() == hf.keys() - {"h.0.inv_freq"}
    for key, tensor in back.items():
        assert torch.equal(tensor, hf[key]), key
    assert back["lm_head.weight"] is back["wte.weight"]


def test_one_tensor_by_key():
    table, hf = _moe_table(), _moe_hf_state_dict()
    out = table.convert("h.0.c_proj.weight", hf["h.0.c_proj.weight"], "from_hf")
    assert list(out) == ["layers.0.fc2.weight"] and torch.equal(out["layers.0.fc2.weight"], hf["h.0.c_proj.weight"].t())
    with pytest.raises(HFInteropError, match=r"'h.0.q.weight' converts together with .*'h.0.k.weight'.*stream"):
        table.convert("h.0.q.weight", hf["h.0.q.weight"], "from_hf")
    with pytest.raises(HFInteropError, match="unexpected key 'h.7.q.weight'"):
        table.group("h.7.q.weight", "from_hf")


def test_stream_emits_each_group_as_soon_as_it_is_complete():
    table, hf = _moe_table(), _moe_hf_state_dict()
    fed: list[str] = []

    def source():
        for key in ["h.0.q.weight", "h.0.k.weight", "h.0.v.weight"] + [k for k in hf if not k.startswith("h.0.")]:
            fed.append(key)
            yield key, hf[key]
        for key in [k for k in hf if k.startswith("h.0.") and k.split(".")[2] not in "qkv"]:
            fed.append(key)
            yield key, hf[key]

    stream = table.stream(source(), "from_hf")
    key, _ = next(stream)
    assert key == "layers.0.qkv.weight" and fed == ["h.0.q.weight", "h.0.k.weight", "h.0.v.weight"]
    rest = dict(stream)
    assert rest.keys() | {key} == table.from_hf(hf).keys()


def test_stream_order_does_not_matter_and_errors_come_at_the_end():
    table, hf = _moe_table(), _moe_hf_state_dict()
    items = list(hf.items())
    random.Random(0).shuffle(items)
    got = dict(table.stream(items, "from_hf"))
    want = table.from_hf(hf)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    bad = dict(hf, **{"lm_head.weight": torch.zeros(5, 4)})
    with pytest.raises(HFInteropError, match="'lm_head.weight' is tied to 'wte.weight' but their weights differ"):
        table.from_hf(bad)
    with pytest.raises(HFInteropError, match="tied to 'wte.weight'"):  # alias before its target
        table.from_hf({"lm_head.weight": bad["lm_head.weight"], **{k: v for k, v in hf.items() if k != "lm_head.weight"}})
    missing = {k: v for k, v in hf.items() if k not in ("h.1.k.weight", "lm_head.weight")}
    with pytest.raises(HFInteropError, match=r"missing keys 'h.1.k.weight', 'lm_head.weight'"):
        table.from_hf(missing)
    with pytest.raises(HFInteropError, match=r"1 unexpected key\(s\).*'h.2.q.weight'"):
        table.from_hf(dict(hf, **{"h.2.q.weight": torch.ones(1)}))


def test_transform_errors_name_the_keys():
    table = KeyTable("toy", [KeyRule("fc1", ("gate", "up"), *GATED_FC1)])
    with pytest.raises(HFInteropError, match=r"toy: converting \['gate', 'up'\] -> \['fc1'\]: gate \(3, 2\)"):
        table.from_hf({"gate": torch.zeros(3, 2), "up": torch.zeros(4, 2)})


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=40))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=40, attention_bias=True, mlp_bias=True))


def _bert():
    return transformers.BertForPreTraining(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=48, vocab_size=40))


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        num_layers=2, num_decoder_layers=3, d_model=32, d_kv=8, num_heads=2, d_ff=48, vocab_size=40,
        feed_forward_proj="gated-gelu"))


def _gptj():
    return transformers.GPTJForCausalLM(transformers.GPTJConfig(
        n_layer=2, n_embd=32, n_head=2, rotary_dim=8, vocab_size=40, bos_token_id=0, eos_token_id=0))


@pytest.mark.parametrize("build_hf", [_gpt2, _llama, _bert, _t5, _gptj], ids=lambda f: f.__name__[1:])
def test_family_table_covers_both_models_and_streams_key_by_key(build_hf):
    from megatron_core.interop import from_hf

    hf = build_hf().eval()
    family = get_family(hf.config.model_type)
    blueprint = family.blueprint_from_hf_model(hf)
    table = family.key_table(blueprint)
    ours = from_hf(hf)
    hf_keys = {k for k in hf.state_dict() if not k.endswith(table.ignore["from_hf"])}
    assert set(table.keys("from_hf")) | set(table.aliases) == hf_keys
    assert set(table.keys("to_hf")) == {k for k in ours.state_dict() if not k.endswith("_extra_state")}
    # Tensor by tensor, in reverse order, gives the whole-dict conversion.
    streamed = dict(table.stream(reversed(list(hf.state_dict().items())), "from_hf"))
    whole = family.state_dict_from_hf(hf.state_dict(), blueprint)
    assert streamed.keys() == whole.keys() and all(torch.equal(streamed[k], whole[k]) for k in whole)
    back = dict(table.stream(ours.state_dict().items(), "to_hf"))
    assert back.keys() == hf_keys
    assert all(torch.equal(back[k], hf.state_dict()[k]) for k in back)
