"""Command-line flags declared on config fields: a method's options live on its config dataclass.

A field declared with :func:`option` becomes a flag of ``secateurs prune`` (and, for
methods that can scan, of ``secateurs sensitivity``); a new method is one module, and
``cli.py`` does not change::

    @dataclass(kw_only=True)
    class ZeroRows(Selection):
        method: ClassVar[str] = "zero-rows"
        rows: int = option(1, help="rows of every Linear to zero", type=positive_int)

gives ``--rows N``, with its help, the method it applies to and its default, and
``--method zero-rows --rows 3`` builds ``ZeroRows(rows=3)``. The flag is the field's
name with hyphens unless ``flag=`` names another; a ``bool`` field is a switch; a
``Literal`` annotation or ``choices=`` gives the values it takes, listed in the help.
Fields of several configs that name one flag (``--ratio``, ``--ignore``, ``--importance``)
make that flag once, its help saying which methods it applies to. A flag the command
defines itself (``--seed``, ``--device``) is reused: its value reaches the configs that
have the field, and it is no error for those that lack it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import SecateursError

__all__ = ["ConfigFlag", "add_config_flags", "config_flags", "config_kwargs", "option", "positive_int"]

_KEYS = ("help", "flag", "choices", "metavar", "type", "parse", "spread", "when")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (sizes and counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str | None = None,  # noqa: A002  (argparse's word)
    flag: str | None = None,
    choices: Sequence[str] | Callable[[], Iterable[str]] | None = None,
    metavar: str | None = None,
    type: Callable[[str], Any] | None = None,  # noqa: A002
    parse: Callable[[Any], Any] | None = None,
    spread: tuple[str, ...] | None = None,
    when: str | None = None,
    **kwargs: Any,
) -> Any:
    """A dataclass field that the command line exposes as a flag.

    Args:
        default: the field's default (``default_factory=`` and other :func:`dataclasses.field`
            arguments pass through).
        help: what the flag does. A flag shared by several configs takes the help of the
            first method (by name) that gives one.
        flag: the option string (default: ``--`` and the field's name, hyphenated).
        choices: the values it takes, or a function returning them (read when the parser
            is built, so registries filled later count). A ``Literal`` annotation gives them too.
        metavar: the value's name in the help (``N:M``, ``MS``).
        type: argparse's converter of the text (default: from the annotation: int, float or str).
        parse: converts the value when the config is built; may raise ``SecateursError``.
        spread: the parsed value is a tuple assigned to these fields (``--nm 2:4`` sets n and m).
        when: pass the value only when this other field is given too (``device`` with
            ``target_latency``).

    Example:
        >>> from dataclasses import dataclass, fields
        >>> @dataclass
        ... class Mine:
        ...     rows: int = option(1, help="rows to zero", type=positive_int)
        >>> fields(Mine)[0].metadata["help"], Mine().rows
        ('rows to zero', 1)
    """
    values = dict(help=help, flag=flag, choices=choices, metavar=metavar, type=type, parse=parse, spread=spread,
                  when=when)
    metadata = {"flag": flag} | {k: v for k, v in values.items() if v is not None}
    return field(default=default, metadata=metadata | dict(kwargs.pop("metadata", {})), **kwargs)


def _exposed(f: dataclasses.Field) -> bool:
    return f.init and ("flag" in f.metadata or "help" in f.metadata)


@dataclass
class ConfigFlag:
    """One flag and the config fields it sets, by config class.

    Attributes:
        option: the option string (``--ratio``).
        dest: its attribute on the parsed namespace.
        switch: takes no value (a ``bool`` field).
        help: the first help given (methods in name order).
        convert: argparse's converter (None: the text).
        metavar: the value's name in the help.
        fields: each config class that has it, with its field.
        choices: each config class's accepted values (empty: any).
        reused: the command defines the flag itself (``--seed``): not ours to add, and no
            error when a method lacks the field.
    """

    option: str
    dest: str
    switch: bool
    help: str | None = None
    convert: Callable[[str], Any] | None = None
    metavar: str | None = None
    fields: dict[type, dataclasses.Field] = field(default_factory=dict)
    choices: dict[type, tuple[str, ...]] = field(default_factory=dict)
    reused: bool = False

    def methods(self) -> list[str]:
        return [cls.method for cls in self.fields]

    def shared_choices(self) -> tuple[str, ...] | None:
        """The choices every config agrees on (None: some accept anything, or they differ)."""
        values = list(self.choices.values())
        if len(values) != len(self.fields) or any(v != values[0] for v in values):
            return None
        return values[0]


def _hint(cls: type, f: dataclasses.Field) -> Any:
    """The field's annotation as a type (a string one when the module cannot evaluate it)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a name imported only for type checking: fall back to the text
        return f.type
    return hints.get(f.name, f.type)


def _base(annotation: Any) -> Any:
    """``X | None`` and ``Optional[X]`` as ``X`` (also in a string annotation)."""
    if isinstance(annotation, str):
        return annotation.replace(" ", "").removesuffix("|None")
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _describe(cls: type, f: dataclasses.Field) -> tuple[bool, Any, tuple[str, ...]]:
    """(switch, argparse type, choices) of one field from its annotation and metadata."""
    meta = f.metadata
    annotation = _base(_hint(cls, f))
    text = annotation if isinstance(annotation, str) else ""
    switch = annotation is bool or text == "bool"
    literal = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
    choices = meta.get("choices", literal)
    if callable(choices):
        choices = choices()
    inferred = next((t for t in (int, float) if annotation is t or text == t.__name__), None)
    kind = meta.get("type") or (None if "parse" in meta else inferred)  # ``parse`` reads the text itself
    return switch, kind, tuple(str(c) for c in choices)


def config_flags(classes: Iterable[type], only: Iterable[str] | None = None) -> dict[str, ConfigFlag]:
    """The flags the fields of ``classes`` declare, keyed by option string, in order of first appearance.

    ``only`` keeps the fields of these names. A flag that is a switch for one config and takes a
    value for another, or has two converters, is refused (``TypeError``): a method's declaration is
    wrong, and :func:`secateurs.register_method` says so when it registers.
    """
    wanted = None if only is None else set(only)
    flags: dict[str, ConfigFlag] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if not _exposed(f) or (wanted is not None and f.name not in wanted):
                continue
            meta = f.metadata
            name = meta.get("flag") or "--" + f.name.replace("_", "-")
            if not name.startswith("--") or len(name) < 3:
                raise TypeError(f"{cls.__name__}.{f.name}: flag '{name}' must start with --")
            switch, kind, choices = _describe(cls, f)
            if switch and f.default is not False:
                raise TypeError(f"{cls.__name__}.{f.name}: a switch (bool field) must default to False")
            flag = flags.setdefault(name, ConfigFlag(name, name[2:].replace("-", "_"), switch))
            if flag.switch != switch:
                raise TypeError(f"{name} is a switch for some methods and takes a value for others "
                                f"({cls.__name__}.{f.name})")
            if kind is not None and flag.convert is not None and kind is not flag.convert:
                raise TypeError(f"{name} converts its value two ways ({cls.__name__}.{f.name})")
            flag.convert = flag.convert or kind
            flag.help = flag.help or meta.get("help")
            flag.metavar = flag.metavar or meta.get("metavar")
            flag.fields[cls] = f
            if choices:
                flag.choices[cls] = choices
    return flags


def _shown(value: Any) -> str | None:
    """A default worth printing in the help (None for unset, off and empty ones)."""
    if value is dataclasses.MISSING or value is None or value is False or value == () or value == []:
        return None
    return str(value)


def _help(flag: ConfigFlag, methods: Sequence[str]) -> str:
    """The flag's help, then which methods it applies to, its choices by method and its defaults."""
    notes = []
    names = flag.methods()
    if sorted(names) != sorted(methods):
        notes.append(("method " if len(names) == 1 else "methods ") + ", ".join(names))
    defaults: dict[str, list[str]] = {}
    for cls, f in flag.fields.items():
        shown = None if "spread" in f.metadata else _shown(f.default)
        if shown is not None:
            defaults.setdefault(shown, []).append(cls.method)
    if len(defaults) == 1 and len(next(iter(defaults.values()))) == len(names):
        notes.append(f"default {next(iter(defaults))}")
    elif defaults:
        notes.append("default " + ", ".join(f"{v} ({', '.join(m)})" for v, m in defaults.items()))
    text = flag.help or ""
    if flag.choices and flag.shared_choices() is None:
        text += "; by method: " + "; ".join(f"{cls.method}: {', '.join(c)}" for cls, c in flag.choices.items())
    if notes:
        text += f" ({'; '.join(notes)})"
    return text.replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, flags: dict[str, ConfigFlag], methods: Sequence[str],
                     title: str = "method options") -> None:
    """Add ``flags`` to ``parser`` in a group of their own; those the parser has already are reused.

    ``methods`` are all the methods the command offers: a flag that applies to every one of them
    does not list them.
    """
    group = parser.add_argument_group(title)
    for flag in flags.values():
        existing = parser._option_string_actions.get(flag.option)  # noqa: SLF001  (argparse has no public lookup)
        if existing is not None:
            flag.reused, flag.dest = True, existing.dest
            continue
        if not flag.help:  # a method registered without help must not break every other command
            flag.help = "the " + " / ".join(f"{cls.__name__}.{f.name}" for cls, f in flag.fields.items()) + " field"
        if flag.switch:
            group.add_argument(flag.option, dest=flag.dest, action="store_true",
                               help=_help(flag, methods))
            continue
        group.add_argument(flag.option, dest=flag.dest, type=flag.convert, metavar=flag.metavar,
                           choices=flag.shared_choices(), help=_help(flag, methods))


def config_kwargs(cls: type, namespace: argparse.Namespace, flags: dict[str, ConfigFlag], *,
                  consumed: Iterable[str] = (), note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The arguments of ``cls`` that the parsed flags give.

    A flag given for a method whose config lacks its field is refused (``--threshold does not
    apply to --method channel``), unless the command defines it itself or it is in ``consumed``
    (flags the command uses in that case). A hyphenated spelling of a choice (``block-influence``)
    gives the underscored one, with a deprecation ``note``.
    """
    kwargs: dict[str, Any] = {}
    whens: dict[str, str] = {}
    for flag in flags.values():
        value = getattr(namespace, flag.dest, None)
        if value is None or value is False:
            continue
        f = flag.fields.get(cls)
        if f is None:
            if flag.reused or flag.option in consumed:
                continue
            raise SecateursError(f"{flag.option} does not apply to --method {cls.method}")
        meta = f.metadata
        value = True if flag.switch else _canonical(value, flag.choices.get(cls, ()), flag.option, note)
        if "parse" in meta:
            value = meta["parse"](value)
        spread = meta.get("spread")
        for name, v in zip(spread, value, strict=True) if spread else [(f.name, value)]:
            kwargs[name] = v
            if "when" in meta:
                whens[name] = meta["when"]
    return {k: v for k, v in kwargs.items() if k not in whens or whens[k] in kwargs}


def _canonical(value: Any, choices: tuple[str, ...], option: str, note: Callable[[str], None] | None) -> Any:
    """Choices are spelled with underscores; ``block-influence`` still gives ``block_influence``."""
    if not isinstance(value, str) or value in choices:
        return value
    fixed = value.replace("-", "_")
    if fixed in choices:
        if note is not None:
            note(f"{option} {value} is deprecated: use {option} {fixed}")
        return fixed
    return value
