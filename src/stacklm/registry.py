"""Small registries that map a config `kind` to a component class and its options dataclass.

A technique plugs into stacklm by defining a module and an options dataclass and registering
them; the transformer block only ever calls `REGISTRY.build(options, ...)`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

from stacklm.errors import UserError


def option(default: Any = dataclasses.MISSING, *, help: str = "", factory: Any = None,
           ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, choices: tuple | None = None, registry: Registry | None = None):
    """A dataclass field with a help text and the checks applied when a config is loaded."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices,
            "registry": registry}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class ComponentConfig:
    """Base of every component's options; `kind` selects the registered implementation."""

    kind: str = ""

    def for_layer(self, layer: int) -> ComponentConfig:
        """The options layer `layer` is built with; a component that differs by layer (MoE in
        every k-th layer) returns other options for some layers."""
        return self

    def causal(self) -> ComponentConfig:
        """The options a causal stack (a decoder) is built with; a component that looks across
        positions (expert-choice routing) returns a causal variant of itself."""
        return self


class Registry:
    def __init__(self, name: str):
        self.name = name
        self._entries: dict[str, tuple[type, type[ComponentConfig]]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, kind: str, config_cls: type[ComponentConfig] = ComponentConfig) -> Callable[[type], type]:
        def decorator(module_cls: type) -> type:
            if kind in self._entries:
                raise ValueError(f"{self.name} kind {kind!r} is registered twice")
            self._entries[kind] = (module_cls, config_cls)
            return module_cls

        return decorator

    def alias(self, name: str, kind: str) -> None:
        """Let configs say `name` for the registered `kind`."""
        self._aliases[name] = kind

    def canonical(self, kind: str) -> str:
        return self._aliases.get(kind, kind)

    @property
    def kinds(self) -> list[str]:
        return sorted(self._entries)

    def _entry(self, kind: str, key: str) -> tuple[type, type[ComponentConfig]]:
        entry = self._entries.get(self.canonical(kind))
        if entry is None:
            names = sorted([*self._entries, *self._aliases])
            hint = difflib.get_close_matches(str(kind), names, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            valid = [f"{n} (= {self._aliases[n]})" if n in self._aliases else n for n in names]
            raise UserError(f"{key}: unknown {self.name} kind {kind!r}{did_you_mean}; valid kinds: {', '.join(valid)}")
        return entry

    def config_class(self, kind: str, key: str = "kind") -> type[ComponentConfig]:
        return self._entry(kind, key)[1]

    def module_class(self, kind: str, key: str = "kind") -> type:
        return self._entry(kind, key)[0]

    def build(self, options: ComponentConfig, *args: Any, **kwargs: Any):
        module_cls, _ = self._entry(options.kind, f"{self.name}.kind")
        return module_cls(options, *args, **kwargs)


ATTENTION = Registry("attention")
FFN = Registry("ffn")
POSITION = Registry("position")
NORM = Registry("norm")
OBJECTIVE = Registry("objective")
QKV = Registry("qkv")  # projections into and out of attention, chosen by model.attention.qkv
