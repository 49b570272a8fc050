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


class Registry:
    def __init__(self, name: str):
        self.name = name
        self._entries: dict[str, tuple[type, type[ComponentConfig]]] = {}

    def register(self, kind: str, config_cls: type[ComponentConfig] = ComponentConfig) -> Callable[[type], type]:
        def decorator(module_cls: type) -> type:
            if kind in self._entries:
                raise ValueError(f"{self.name} kind {kind!r} is registered twice")
            self._entries[kind] = (module_cls, config_cls)
            return module_cls

        return decorator

    @property
    def kinds(self) -> list[str]:
        return sorted(self._entries)

    def _entry(self, kind: str, key: str) -> tuple[type, type[ComponentConfig]]:
        if kind not in self._entries:
            hint = difflib.get_close_matches(str(kind), self.kinds, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise UserError(
                f"{key}: unknown {self.name} kind {kind!r}{did_you_mean}; "
                f"valid kinds: {', '.join(self.kinds)}"
            )
        return self._entries[kind]

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
