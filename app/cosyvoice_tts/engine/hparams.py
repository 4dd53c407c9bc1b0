"""Read a release `cosyvoice2.yaml` without hyperpyyaml or the upstream package.

The release yaml names upstream classes with hyperpyyaml tags (`!new:`, `!name:`, `!apply:`, `!ref`). We parse
the tags into plain descriptions and build only what inference needs through our own registry, so the
hyper-parameters come from the file while no upstream code is imported (and nothing in the yaml is executed).
"""
from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml


class HParamsError(ValueError):
    """The yaml cannot be understood as a CosyVoice2 configuration."""


@dataclass
class Tagged:
    """A `!new:`, `!name:` or `!apply:` node: what to build and with which arguments."""

    kind: str  # "new" | "name" | "apply"
    target: str  # dotted upstream path, e.g. cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)


@dataclass
class Ref:
    """`!ref <key>` or an arithmetic expression over references, e.g. `<a> * <b>`."""

    expr: str


class _Loader(yaml.SafeLoader):
    pass


def _construct_tagged(kind: str):
    def construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Tagged:
        if isinstance(node, yaml.MappingNode):
            return Tagged(kind, suffix, kwargs=loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return Tagged(kind, suffix, args=loader.construct_sequence(node, deep=True))
        value = loader.construct_scalar(node)
        return Tagged(kind, suffix, args=[] if value in ("", None) else [value])

    return construct


def _construct_ref(loader: yaml.SafeLoader, node: yaml.Node) -> Ref:
    return Ref(str(loader.construct_scalar(node)))


for _kind in ("new", "name", "apply"):
    _Loader.add_multi_constructor(f"!{_kind}:", _construct_tagged(_kind))
_Loader.add_constructor("!ref", _construct_ref)
# hyperpyyaml also has !copy and !include; the release files don't use them, so they stay errors.

_REF_RE = re.compile(r"<([^<>]+)>")
_ARITH = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.USub: operator.neg,
}


def _eval_arith(expr: str) -> Any:
    """Evaluate + - * / over numbers only (hyperpyyaml allows arithmetic in !ref)."""

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            return _ARITH[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _ARITH:
            return _ARITH[type(node.op)](walk(node.operand))
        raise HParamsError(f"unsupported expression in !ref: {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


class HParams:
    """Parsed yaml with references resolved lazily; `build(key, registry)` instantiates one entry."""

    def __init__(self, raw: Mapping[str, Any], source: str = "<yaml>"):
        self.raw = dict(raw)
        self.source = source

    @classmethod
    def from_file(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> "HParams":
        path = Path(path)
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
        except yaml.YAMLError as exc:
            raise HParamsError(f"{path}: not valid yaml: {exc}") from exc
        if not isinstance(raw, dict):
            raise HParamsError(f"{path}: the top level must be a mapping")
        raw.update(overrides or {})
        return cls(raw, str(path))

    def lookup(self, key: str, _seen: tuple = ()) -> Any:
        if key in _seen:
            raise HParamsError(f"{self.source}: circular !ref through {' -> '.join(_seen + (key,))}")
        if key not in self.raw:
            raise HParamsError(f"{self.source}: !ref <{key}> names no top-level key")
        return self.resolve(self.raw[key], _seen + (key,))

    def resolve(self, value: Any, _seen: tuple = ()) -> Any:
        """Replace every Ref by its value; Tagged nodes keep their shape with resolved arguments."""
        if isinstance(value, Ref):
            names = _REF_RE.findall(value.expr)
            if len(names) == 1 and value.expr.strip() == f"<{names[0]}>":
                return self.lookup(names[0], _seen)
            text = _REF_RE.sub(lambda m: repr(self.lookup(m.group(1), _seen)), value.expr)
            return _eval_arith(text)
        if isinstance(value, Tagged):
            return Tagged(
                value.kind,
                value.target,
                [self.resolve(a, _seen) for a in value.args],
                {k: self.resolve(v, _seen) for k, v in value.kwargs.items()},
            )
        if isinstance(value, dict):
            return {k: self.resolve(v, _seen) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, _seen) for v in value]
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self.lookup(key) if key in self.raw else default

    def build(self, key: str, registry: Mapping[str, Callable[..., Any]]) -> Any:
        return instantiate(self.lookup(key), registry, where=f"{self.source}:{key}")


def instantiate(value: Any, registry: Mapping[str, Callable[..., Any]], where: str = "") -> Any:
    """Build Tagged nodes bottom-up with the registry (upstream path -> our callable)."""
    if isinstance(value, Tagged):
        args = [instantiate(a, registry, where) for a in value.args]
        kwargs = {k: instantiate(v, registry, where) for k, v in value.kwargs.items()}
        if value.target not in registry:
            raise HParamsError(f"{where}: no implementation for !{value.kind}:{value.target}")
        # `!name:` is a partial in hyperpyyaml; registry entries for such paths take the bound kwargs directly.
        return registry[value.target](*args, **kwargs)
    if isinstance(value, dict):
        return {k: instantiate(v, registry, where) for k, v in value.items()}
    if isinstance(value, list):
        return [instantiate(v, registry, where) for v in value]
    return value
