"""Key tables: one declarative list of rules per Hugging Face family, read in both directions.

A family describes its state-dict mapping once, as a list of :class:`KeyRule` (our key
pattern(s), Hugging Face key pattern(s), forward transform, inverse transform) plus :class:`Alias`
entries for tied Hugging Face keys. :class:`KeyTable` derives every conversion from that one list, so
``from_hf`` and ``to_hf`` cannot drift apart:

* ``table.from_hf(hf_state_dict)`` / ``table.to_hf(our_state_dict)``: whole state dicts; missing
  and left-over keys fail loudly, naming them.
* ``table.stream(items, "from_hf" | "to_hf")``: an iterator of ``(key, tensor)`` in, ``(key, tensor)``
  out, holding only the tensors of groups not yet complete (for safetensors read tensor by tensor).
* ``table.group(key, direction)``: the :class:`KeyGroup` a key belongs to: every source key it
  needs, the keys it produces and the transform; ``table.convert(key, tensor, direction)`` converts
  one tensor whose group has no other member (``name -> {name: tensor}``).

Patterns hold placeholders ``{name}`` whose values the table gets from ``placeholders`` (an int n
means ``0..n-1``; any sequence of ints or strings is taken as is)::

    KeyRule("decoder.layers.{layer}.mlp.linear_fc2.{p}", "model.layers.{layer}.mlp.down_proj.{p}")
    KeyRule("decoder.layers.{layer}.self_attention.linear_qkv.weight",
            ("model.layers.{layer}.self_attn.q_proj.weight", "model.layers.{layer}.self_attn.k_proj.weight",
             "model.layers.{layer}.self_attn.v_proj.weight"), *qkv_transforms(heads, groups, head_dim))
    KeyTable("llama", rules, placeholders={"layer": num_layers, "p": ("weight", "bias")})

A placeholder found in every pattern of a rule repeats the rule (one group per value). A placeholder
found in only some patterns is expanded *inside* the group, in order: with ``{"expert": 8}``,
``KeyRule("decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight",
"model.layers.{layer}.mlp.experts.gate_up_proj", *unstack_transforms())`` maps one stacked Hugging
Face tensor to eight keys of ours per layer, and per-expert Hugging Face keys
(``...experts.{expert}.w1.weight``) are one group per expert instead.

Transforms take the source tensors in pattern order and return the destination tensors in pattern
order; ``layouts.py`` holds the usual pairs (identity, transpose, q/k/v fusion, gate/up, stacking).
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from megatron_core.interop.errors import HFInteropError, StateDict

#: Tensors of one group in pattern order -> the other side's tensors in pattern order.
Transform = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]
Direction = Literal["from_hf", "to_hf"]
Placeholders = Mapping[str, "int | Sequence[int | str]"]


_FIX_UNEXPECTED = (
    "Fix: the model has modules its family's key table does not know; convert a supported architecture "
    "or add a rule to the family's key table."
)


def _listed(keys: Sequence[str], most: int = 8) -> str:
    return ", ".join(repr(k) for k in keys[:most]) + (", ..." if len(keys) > most else "")


def reindexing(transform: Transform) -> Transform:
    """Mark ``transform`` as pure reindexing: every output element is one source element (no arithmetic), and
    which one depends on each output dimension separately (row r from source s(r), row i(r); column c from
    column j(c)), as for concatenation, splitting, reshaping whole rows and transposing.

    ``load_hf_dir`` then reads only each rank's part of the sources (``slice_plan``); unmarked
    transforms get their sources whole.
    """
    transform.reindexing = True  # type: ignore[attr-defined]
    return transform


def is_reindexing(transform: Transform) -> bool:
    """Whether ``transform`` was marked with :func:`reindexing`."""
    return bool(getattr(transform, "reindexing", False))


@reindexing
def same(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """The identity transform (the tensor is stored as is on both sides)."""
    return tensors


def _as_tuple(patterns: str | Sequence[str]) -> tuple[str, ...]:
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)


@dataclass(frozen=True)
class KeyRule:
    """Our key pattern(s) <-> Hugging Face key pattern(s), with the transform each way.

    Attributes:
        ours: pattern(s) of our keys (Megatron-Core names).
        hf: pattern(s) of the Hugging Face keys.
        forward: Hugging Face tensors (in ``hf`` order) -> ours (in ``ours`` order).
        inverse: ours -> Hugging Face; must undo ``forward`` exactly.
    """

    ours: str | tuple[str, ...]
    hf: str | tuple[str, ...]
    forward: Transform = same
    inverse: Transform = same


@dataclass(frozen=True)
class Alias:
    """A Hugging Face key holding the same tensor as another one (tied weights; ours has no such key).

    ``from_hf`` consumes it (and with ``check`` raises when it differs from ``of``); ``to_hf``
    writes the tensor of ``of`` under it.

    Attributes:
        hf: the alias key pattern (e.g. ``"lm_head.weight"``).
        of: the Hugging Face key pattern it equals (e.g. ``"transformer.wte.weight"``).
        required: ``from_hf`` fails when the key is absent.
        check: ``from_hf`` fails when its tensor differs from the tensor of ``of``.
    """

    hf: str
    of: str
    required: bool = True
    check: bool = False


@dataclass(frozen=True)
class KeyGroup:
    """One expanded rule: concrete keys on both sides and the transforms between them."""

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    forward: Transform
    inverse: Transform

    def sides(self, direction: Direction) -> tuple[tuple[str, ...], tuple[str, ...], Transform]:
        """(source keys, destination keys, transform) when converting in ``direction``."""
        if direction == "from_hf":
            return self.hf, self.ours, self.forward
        return self.ours, self.hf, self.inverse


def _names(pattern: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(pattern) if name]


def _values(placeholders: Placeholders, name: str, where: str) -> Sequence[int | str]:
    if name not in placeholders:
        raise HFInteropError(
            f"key pattern {where!r} uses placeholder {{{name}}} but the table defines only "
            f"{sorted(placeholders)}. Fix: pass placeholders={{{name!r}: ...}} to KeyTable."
        )
    values = placeholders[name]
    return range(values) if isinstance(values, int) else values


def _bindings(names: Sequence[str], placeholders: Placeholders, where: str) -> Iterator[dict[str, int | str]]:
    """Every assignment of values to ``names``, in order (one empty assignment when there are none)."""
    for combo in itertools.product(*(_values(placeholders, n, where) for n in names)):
        yield dict(zip(names, combo, strict=True))


def _fill(pattern: str, bound: Mapping[str, int | str], placeholders: Placeholders) -> list[str]:
    """All keys of ``pattern`` with ``bound`` fixed and its other placeholders expanded in order."""
    inner = [n for n in dict.fromkeys(_names(pattern)) if n not in bound]
    return [pattern.format(**bound, **more) for more in _bindings(inner, placeholders, pattern)]


def _expand(patterns: Sequence[str], placeholders: Placeholders) -> Iterator[tuple[list[str], ...]]:
    """For each value of the placeholders shared by all ``patterns``: the keys of each pattern."""
    shared = [n for n in dict.fromkeys(_names(patterns[0])) if all(n in _names(p) for p in patterns)]
    for bound in _bindings(shared, placeholders, patterns[0]):
        yield tuple(_fill(p, bound, placeholders) for p in patterns)


@dataclass
class _Pending:
    """Source tensors of groups that are not complete yet, and the alias bookkeeping of one stream."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)
    alias_targets: dict[str, torch.Tensor] = field(default_factory=dict)


class KeyTable:
    """The state-dict mapping of one family for one configuration, usable in both directions.

    Args:
        family: the Hugging Face ``model_type``, for error messages.
        rules: the family's :class:`KeyRule` and :class:`Alias` entries.
        placeholders: values of each ``{name}`` used in the patterns.
        hf_ignore: key suffixes a Hugging Face state dict may hold that are not weights (buffers).
        ours_ignore: key suffixes of ours that are not weights (``_extra_state``).
    """

    def __init__(
        self,
        family: str,
        rules: Iterable[KeyRule | Alias],
        placeholders: Placeholders | None = None,
        *,
        hf_ignore: tuple[str, ...] = (),
        ours_ignore: tuple[str, ...] = ("_extra_state",),
    ) -> None:
        self.family = family
        self.ignore: dict[Direction, tuple[str, ...]] = {"from_hf": hf_ignore, "to_hf": ours_ignore}
        self.groups: list[KeyGroup] = []
        self.aliases: dict[str, Alias] = {}
        values = dict(placeholders or {})
        for rule in rules:
            if isinstance(rule, Alias):
                # The target takes the alias's placeholder values ("{stack}.embed_tokens" -> "shared").
                for bound in _bindings(list(dict.fromkeys(_names(rule.hf))), values, rule.hf):
                    alias = rule.hf.format(**bound)
                    self.aliases[alias] = Alias(alias, rule.of.format(**bound), rule.required, rule.check)
                continue
            ours, hf = _as_tuple(rule.ours), _as_tuple(rule.hf)
            for keys in _expand(ours + hf, values):
                flat_ours = tuple(k for keys_of in keys[: len(ours)] for k in keys_of)
                flat_hf = tuple(k for keys_of in keys[len(ours):] for k in keys_of)
                self.groups.append(KeyGroup(flat_ours, flat_hf, rule.forward, rule.inverse))
        self._index: dict[Direction, dict[str, KeyGroup]] = {"from_hf": {}, "to_hf": {}}
        for group in self.groups:
            for direction in ("from_hf", "to_hf"):
                for key in group.sides(direction)[0]:
                    if key in self._index[direction] or key in self.aliases:
                        raise HFInteropError(f"{family} key table: key {key!r} is mapped twice")
                    self._index[direction][key] = group

    # ------------------------------------------------------------------ lookups
    def keys(self, direction: Direction) -> list[str]:
        """The source keys a full conversion in ``direction`` expects (aliases not included)."""
        return list(self._index[direction])

    def group(self, key: str, direction: Direction) -> KeyGroup:
        """The group that source ``key`` belongs to when converting in ``direction``."""
        if key not in self._index[direction]:
            raise HFInteropError(f"{self._source(direction)}: unexpected key {key!r} with no converter. {_FIX_UNEXPECTED}")
        return self._index[direction][key]

    def convert(self, key: str, tensor: torch.Tensor, direction: Direction) -> StateDict:
        """Convert one tensor whose group has no other source key: ``{destination key: tensor}``."""
        group = self.group(key, direction)
        sources = group.sides(direction)[0]
        if sources != (key,):
            raise HFInteropError(
                f"{self.family}: {key!r} converts together with {list(sources)}; use "
                "KeyTable.stream (it waits for the whole group) or pass all of them."
            )
        return self._apply(group, [tensor], direction)

    # ------------------------------------------------------------------ conversions
    def from_hf(self, hf_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
        """Hugging Face state dict -> ours (Megatron-Core names and layouts)."""
        return dict(self.stream(hf_state_dict.items(), "from_hf"))

    def to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
        """Our state dict -> Hugging Face names and layouts (tied keys written as the same tensor)."""
        return dict(self.stream(state_dict.items(), "to_hf"))

    def stream(
        self, items: Iterable[tuple[str, torch.Tensor]], direction: Direction
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Convert ``(key, tensor)`` pairs as they come; each group is emitted once all its keys arrived.

        Raises (after the last item) HFInteropError naming missing keys and left-over keys.
        """
        pending = _Pending()
        for key, tensor in items:
            if key in pending.seen:
                raise HFInteropError(f"{self.family}: key {key!r} given twice")
            pending.seen.add(key)
            if key.endswith(self.ignore[direction]):
                continue
            if direction == "from_hf" and key in self.aliases:
                self._check_alias(key, tensor, pending)
                continue
            group = self._index[direction].get(key)
            if group is None:
                pending.unexpected.append(key)
                continue
            self._remember_alias_target(key, tensor, pending)
            pending.tensors[key] = tensor
            sources = group.sides(direction)[0]
            if all(k in pending.tensors for k in sources):
                yield from self._apply(group, [pending.tensors.pop(k) for k in sources], direction).items()
        self._finish(pending, direction)

    # ------------------------------------------------------------------ internals
    def _source(self, direction: Direction) -> str:
        return f"{self.family} state dict" if direction == "from_hf" else f"our {self.family} state dict"

    def _apply(self, group: KeyGroup, tensors: list[torch.Tensor], direction: Direction) -> StateDict:
        sources, destinations, transform = group.sides(direction)
        try:
            converted = list(transform(tensors))
        except (ValueError, RuntimeError) as err:
            raise HFInteropError(f"{self.family}: converting {list(sources)} -> {list(destinations)}: {err}") from err
        if len(converted) != len(destinations):
            raise HFInteropError(
                f"{self.family} key table: the transform of {list(sources)} returned {len(converted)} "
                f"tensors for {len(destinations)} keys {list(destinations)}"
            )
        out = dict(zip(destinations, converted, strict=True))
        if direction == "to_hf":
            for alias in self.aliases.values():
                if alias.of in out:
                    out[alias.hf] = out[alias.of]
        return out

    def _remember_alias_target(self, key: str, tensor: torch.Tensor, pending: _Pending) -> None:
        waiting = [a for a in self.aliases.values() if a.check and a.of == key]
        if not waiting:
            return
        pending.alias_targets[key] = tensor
        for alias in waiting:
            if alias.hf in pending.alias_targets:
                self._compare(alias, pending.alias_targets.pop(alias.hf), tensor)

    def _check_alias(self, key: str, tensor: torch.Tensor, pending: _Pending) -> None:
        alias = self.aliases[key]
        if not alias.check:
            return
        if alias.of in pending.alias_targets:
            self._compare(alias, tensor, pending.alias_targets[alias.of])
        else:
            pending.alias_targets[key] = tensor  # compared when its target arrives

    def _compare(self, alias: Alias, tensor: torch.Tensor, target: torch.Tensor) -> None:
        if tensor.shape != target.shape or not torch.equal(tensor, target):
            raise HFInteropError(
                f"{self.family}: {alias.hf!r} is tied to {alias.of!r} but their weights differ. Fix: convert "
                "the model object (from_hf reads the tie from it) or untie the config (tie_word_embeddings=False)."
            )

    def _finish(self, pending: _Pending, direction: Direction) -> None:
        source = self._source(direction)
        missing = [k for k in self._index[direction] if k not in pending.seen]
        if direction == "from_hf":
            missing += [k for k, a in self.aliases.items() if a.required and k not in pending.seen]
        if missing:
            raise HFInteropError(
                f"{source}: missing key{'s' if len(missing) > 1 else ''} {_listed(missing)}. "
                "Fix: check that the model matches its config (layers, biases, tied weights)."
            )
        if pending.unexpected:
            left = pending.unexpected
            raise HFInteropError(
                f"{source}: {len(left)} unexpected key(s) with no converter: {_listed(left)}. {_FIX_UNEXPECTED}"
            )
