"""ModuleSpec and build_module: a spec says *what* a submodule is, the config says how big.

A ``ModuleSpec`` names a module (a class, a function, or a dotted import path), the keyword
arguments it is built with (``params``) and, for composite modules, a dataclass of submodule specs
(``submodules``). ``build_module`` turns a spec into an object.

Submodule dataclasses may declare a slot with a builder ``Protocol`` (``LinearFc1Builder``...).
Building checks that whatever fills such a slot can accept the Protocol's call, so a wrong custom
module fails at build time with a ``SpecError`` naming the slot path, not deep inside ``forward``.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class SpecError(TypeError):
    """A spec cannot be built: unknown import path, or a module that does not fit its slot."""


@dataclass
class ModuleSpec:
    """What to build for one module slot.

    Args:
        module: a class, a function, or a dotted import path to either (``"pkg.mod.Class"``).
        params: keyword arguments merged into the constructor call.
        submodules: a dataclass (e.g. ``MLPSubmodules``) of child specs, passed as ``submodules=``.
    """

    module: type | types.FunctionType | str
    params: dict[str, Any] = field(default_factory=dict)
    submodules: Any = None

    def __str__(self) -> str:
        return format_spec(self)


def import_by_path(path: str) -> Any:
    """Import ``"pkg.module.Name"`` (attributes may be nested: ``"pkg.mod.Outer.Inner"``)."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:  # not a module: try a shorter prefix; other import errors propagate
            continue
        try:
            for name in parts[split:]:
                obj = getattr(obj, name)
        except AttributeError as err:
            raise SpecError(f"cannot import {path!r}: {err}") from err
        return obj
    raise SpecError(f"cannot import {path!r}: no importable module prefix; check the dotted path")


def dotted_path(obj: Any) -> str:
    """The import path of a class or function (the inverse of ``import_by_path``)."""
    return f"{obj.__module__}.{obj.__qualname__}"


def resolve_module(module: Any) -> Any:
    return import_by_path(module) if isinstance(module, str) else module


def build_module(spec_or_module: Any, *args: Any, **kwargs: Any) -> Any:
    """Build a module from a spec, a class, a function or an import path.

    Functions are returned as they are (a spec slot may hold an activation function); classes
    are called with ``*args``, the spec's ``params`` merged under ``**kwargs``, and
    ``submodules=`` when the spec has submodules.
    """
    if isinstance(spec_or_module, ModuleSpec):
        target = resolve_module(spec_or_module.module)
        params = dict(spec_or_module.params)
        submodules = spec_or_module.submodules
    else:
        target = resolve_module(spec_or_module)
        params, submodules = {}, None
    if isinstance(target, (types.FunctionType, types.BuiltinFunctionType)) and not inspect.isclass(target):
        return target
    if submodules is not None:
        check_spec(spec_or_module, getattr(target, "__name__", str(target)))
        params["submodules"] = submodules
    params.update(kwargs)
    return target(*args, **params)


# ----------------------------------------------------------------------------- Protocol checks
def _slot_protocols(submodules_type: type) -> dict[str, type]:
    """Map slot name -> the builder Protocol declared in its annotation (when there is one)."""
    try:
        hints = typing.get_type_hints(submodules_type)
    except Exception:  # unresolvable forward refs: no protocol checks rather than a crash
        return {}
    protocols: dict[str, type] = {}
    for name, hint in hints.items():
        candidates = typing.get_args(hint) or (hint,)
        for candidate in candidates:
            if getattr(candidate, "_is_protocol", False) and "__call__" in vars(candidate):
                protocols[name] = candidate
                break
    return protocols


def _protocol_call_arguments(protocol: type) -> tuple[list[str], list[str]]:
    """(positional-only parameter names, keyword parameter names) of ``protocol.__call__``."""
    sig = inspect.signature(vars(protocol)["__call__"])
    positional, keywords = [], []
    for p in list(sig.parameters.values())[1:]:  # skip self
        if p.kind is p.POSITIONAL_ONLY:
            positional.append(p.name)
        elif p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            keywords.append(p.name)
    return positional, keywords


def check_fits_protocol(value: Any, protocol: type, slot_path: str) -> None:
    """Raise ``SpecError`` when ``value`` (spec, class or function) cannot take ``protocol``'s call."""
    if value is None:
        return
    if isinstance(value, ModuleSpec):
        target, preset = resolve_module(value.module), dict(value.params)
        if value.submodules is not None:  # build_module passes them as submodules=
            preset["submodules"] = value.submodules
    else:
        target, preset = resolve_module(value), {}
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to check
    positional, keywords = _protocol_call_arguments(protocol)
    call_kwargs = {name: None for name in keywords}
    call_kwargs.update({k: v for k, v in preset.items()})
    try:
        sig.bind(*[None] * len(positional), **call_kwargs)
    except TypeError as err:
        name = getattr(target, "__qualname__", repr(target))
        raise SpecError(
            f"spec slot '{slot_path}': {name} cannot be built as a {protocol.__name__} "
            f"(called with positional {positional} and keywords {keywords}): {err}. "
            f"Fix: give {name}.__init__ the signature of {protocol.__name__}.__call__."
        ) from None


def check_spec(spec: Any, path: str) -> None:
    """Check every Protocol-typed slot below ``spec``; errors name the dotted slot path."""
    if not isinstance(spec, ModuleSpec) or spec.submodules is None:
        return
    subs = spec.submodules
    if not dataclasses.is_dataclass(subs):
        return
    protocols = _slot_protocols(type(subs))
    for f in dataclasses.fields(subs):
        value = getattr(subs, f.name)
        slot = f"{path}.{f.name}" if path else f.name
        if f.name in protocols:
            check_fits_protocol(value, protocols[f.name], slot)
        check_spec(value, slot)


# ----------------------------------------------------------------------------- printing
def format_spec(spec: Any, indent: int = 0) -> str:
    """A readable tree of a spec: one line per module, params inline, submodules indented."""
    pad = "  " * indent
    if isinstance(spec, ModuleSpec):
        module = spec.module if isinstance(spec.module, str) else spec.module.__name__
        params = f" {spec.params}" if spec.params else ""
        lines = [f"{module}{params}"]
        subs = spec.submodules
        if dataclasses.is_dataclass(subs):
            for f in dataclasses.fields(subs):
                child = format_spec(getattr(subs, f.name), indent + 1).lstrip()
                lines.append(f"{pad}  {f.name}: {child}")
        return "\n".join(lines)
    if spec is None:
        return "None"
    return getattr(spec, "__name__", repr(spec))


# ----------------------------------------------------------------------------- dict / YAML
def _value_to_plain(value: Any) -> Any:
    if isinstance(value, ModuleSpec):
        return spec_to_dict(value)
    if isinstance(value, enum.Enum):
        return {"enum": dotted_path(type(value)), "name": value.name}
    if inspect.isclass(value) or isinstance(value, types.FunctionType):
        return {"import": dotted_path(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {"dataclass": dotted_path(type(value))}
        for f in dataclasses.fields(value):
            out[f.name] = _value_to_plain(getattr(value, f.name))
        return out
    if isinstance(value, dict):
        return {k: _value_to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_value_to_plain(v) for v in value]
    return value


def _value_from_plain(value: Any) -> Any:
    if isinstance(value, dict):
        if "module" in value and set(value) <= {"module", "params", "submodules"}:
            return spec_from_dict(value)
        if set(value) == {"enum", "name"}:
            return import_by_path(value["enum"])[value["name"]]
        if set(value) == {"import"}:
            return import_by_path(value["import"])
        if "dataclass" in value:
            cls = import_by_path(value["dataclass"])
            return cls(**{k: _value_from_plain(v) for k, v in value.items() if k != "dataclass"})
        return {k: _value_from_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_value_from_plain(v) for v in value]
    return value


def spec_to_dict(spec: ModuleSpec) -> dict[str, Any]:
    """A plain dict of ``spec`` with dotted import paths (YAML/JSON friendly)."""
    module = spec.module if isinstance(spec.module, str) else dotted_path(spec.module)
    out: dict[str, Any] = {"module": module}
    if spec.params:
        out["params"] = _value_to_plain(spec.params)
    if spec.submodules is not None:
        out["submodules"] = _value_to_plain(spec.submodules)
    return out


def spec_from_dict(data: dict[str, Any]) -> ModuleSpec:
    """Inverse of ``spec_to_dict``; imports resolve lazily at build time for ``module``."""
    if "module" not in data:
        raise SpecError(f"a spec dict needs a 'module' entry; got keys {sorted(data)}")
    unknown = set(data) - {"module", "params", "submodules"}
    if unknown:
        raise SpecError(f"unknown spec entries {sorted(unknown)}; allowed: module, params, submodules")
    module = data["module"]
    return ModuleSpec(
        module=import_by_path(module) if isinstance(module, str) else module,
        params=_value_from_plain(data.get("params", {})),
        submodules=_value_from_plain(data.get("submodules")),
    )


def spec_to_yaml(spec: ModuleSpec) -> str:
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False)


def spec_from_yaml(text: str) -> ModuleSpec:
    return spec_from_dict(yaml.safe_load(text))
