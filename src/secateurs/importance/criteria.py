"""Looking up a criterion a config names, for channel and element-wise registries alike."""

from __future__ import annotations

from typing import Any, TypeVar

from ..errors import SecateursError

__all__ = ["register_criterion", "resolve_criterion"]

C = TypeVar("C")


def resolve_criterion(criterion: str | C, base: type[C], registry: dict[str, C]) -> C:
    """``criterion`` as an instance of ``base``: a registered name, or an instance with a name of its own.

    An instance is refused without a name (reports and saved configs record it by name) or with the
    name of a registered criterion of another class (a saved config would replay that one).
    """
    if isinstance(criterion, base):
        name: Any = getattr(criterion, "name", "")
        if not isinstance(name, str) or not name.strip():
            raise SecateursError(f"{type(criterion).__name__} has no name: set its name attribute (reports and "
                                 "saved configs record the criterion by name)")
        known = registry.get(name)
        if known is not None and type(known) is not type(criterion):  # another instance of it is fine
            raise SecateursError(f"importance '{name}' is the name of a registered criterion ({known!r}): give "
                                 f"{type(criterion).__name__} another name")
        return criterion
    found = registry.get(criterion) if isinstance(criterion, str) else None
    if found is None:
        raise SecateursError(f"unknown importance {criterion!r}: choose one of {', '.join(registry)}, or pass a "
                             f"{base.__name__} (secateurs.importance)")
    return found


def register_criterion(criterion: Any, base: type, registry: dict[str, Any], kind: str) -> Any:
    """Add ``criterion`` (an instance of ``base``, or a subclass, instantiated with no arguments) to
    ``registry`` under its name; ``kind`` names the registry in messages. Returns ``criterion``."""
    instance = criterion() if isinstance(criterion, type) and issubclass(criterion, base) else criterion
    if not isinstance(instance, base):
        raise SecateursError(f"a {kind} criterion subclasses secateurs.importance.{base.__name__}; got "
                             f"{type(criterion).__name__}")
    name = instance.name
    if not isinstance(name, str) or not name.strip():
        raise SecateursError(f"{type(instance).__name__} has no name: set its name attribute (e.g. name = "
                             "'my_criterion') before registering it")
    if name in registry:
        raise SecateursError(f"{kind} importance '{name}' is already registered ({registry[name]!r}): "
                             "give yours another name")
    registry[name] = instance
    return criterion
