"""What a saved model folder may ask for when it is loaded without ``trust_code``.

A model folder is data. Its manifest names how to rebuild the architecture,
and everything it names is checked here *before* anything is imported or
constructed:

- torchvision and timm builders by their registered name, built without
  weights (``weights=None``, ``weights_backbone=None``, ``pretrained=False``);
- transformers model classes that the installed transformers exports, with a
  ``model_type`` it knows and no remote code or kernels from the Hub;
- the classes of :mod:`secateurs.zoo`.

Constructor keyword arguments must be plain values (numbers, booleans, short
words, short lists of them) and must not name a file, URL, download or
pretrained weights. Anything else -- a ``module:factory`` of the folder's
choosing -- runs code, and needs ``trust_code=True`` (CLI: ``--trust-code``).

Sizes are not trusted either: :func:`secateurs.load` builds the architecture on
the meta device and compares every tensor with the weights file before it
allocates anything.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

from ..errors import SecateursError
from ..provenance import describe

__all__ = ["MAX_DEPTH", "check_depth", "check_hf_config", "check_kwargs", "check_source", "is_plain_file_name",
           "module_budget", "offline",
           "ZOO_MODULE"]

ZOO_MODULE = "secateurs.zoo"
MAX_DEPTH = 64  # a manifest is a few levels deep; 100,000 levels only crash parsers
MAX_INT = 2**31 - 1
MAX_STR = 64
MAX_LIST = 64
# keyword names that load something from elsewhere (files, the network, caches, weights);
# matched on whole words of the snake_case name, so ``drop_path_rate`` stays allowed
_FORBIDDEN_WORDS = {"weights", "pretrained", "checkpoint", "file", "filename", "url", "download", "cache", "hub",
                    "repo", "remote", "overlay", "dir", "token", "revision"}
_FORBIDDEN_LAST = {"path", "paths"}  # drop_path_rate is a rate; checkpoint_path is a path
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
# attention implementations that only use installed code (a "repo/name" value fetches kernels from the Hub)
# config keys whose string values name something to load (timm_wrapper's "architecture", DETR's "backbone")
_NAMES_SOMETHING = re.compile(r"architecture|backbone|model|name|path|file|repo|url|checkpoint|hub|dir", re.IGNORECASE)
_SAFE_ATTENTION = {None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"}


def _refuse(source: dict[str, Any], what: str) -> SecateursError:
    return SecateursError(
        f"the model folder asks to build {describe(source)} {what}: load it with trust_code=True "
        "(CLI: --trust-code) only if you trust where it came from"
    )


def check_depth(obj: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON data nested deeper than ``limit`` (iteratively: no recursion to exhaust)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise SecateursError(f"the manifest is nested more than {limit} levels deep: it was not written "
                                     "by secateurs; re-save the model")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def is_plain_file_name(name: Any) -> bool:
    """A file name that stays inside the folder it is joined to (no separators, no ``.``/``..``, no NUL)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) <= MAX_INT
    if isinstance(value, float):
        return value == value and abs(value) < 1e12  # no NaN/inf
    if isinstance(value, str):
        return len(value) <= MAX_STR and re.fullmatch(r"[A-Za-z0-9_.\-]*", value) is not None and ".." not in value
    return False


def check_kwargs(source: dict[str, Any], kwargs: Any, allowed: set[str] | None = None) -> dict[str, Any]:
    """The constructor keywords a folder may pass without trust, or an error naming the first one refused.

    Args:
        source: the manifest's source (for the message).
        kwargs: the keywords it asks for.
        allowed: the names the constructor declares, when it takes no ``**kwargs``.
    """
    if not isinstance(kwargs, dict):
        raise SecateursError("the architecture kwargs in the manifest are malformed: re-save the model")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise SecateursError(f"the architecture kwargs in the manifest have a bad name {key!r}: re-save the model")
        words = key.lower().split("_")
        if set(words) & _FORBIDDEN_WORDS or words[-1] in _FORBIDDEN_LAST:
            raise _refuse(source, f"with {key}={value!r} (it could read files or download weights)")
        if allowed is not None and key not in allowed:
            raise _refuse(source, f"with {key}={value!r}, which its constructor does not take")
        items = value if isinstance(value, list) and len(value) <= MAX_LIST else [value]
        if not all(_plain(v) for v in items):
            shown = repr(value)
            raise _refuse(source, f"with {key}={shown[:60]}{'...' if len(shown) > 60 else ''} "
                          "(only numbers, booleans and short words are accepted)")
    return kwargs


def _check_name(source: dict[str, Any], field: str) -> str:
    name = source.get(field)
    if not isinstance(name, str) or not _NAME.match(name):
        raise SecateursError(f"the architecture record has a bad {field} {str(name)[:60]!r}: re-save the model")
    return name


def check_hf_config(config: Any, what: str, *, remote_code_ok: bool = False) -> None:
    """Refuse a transformers config (a dict) that would fetch or read anything while the model is built.

    Refused anywhere in the config (sub-configs too): remote code (``auto_map``),
    attention kernels from the Hub, a truthy ``*pretrained*`` flag (DETR-style
    configs build a pretrained timm backbone), a path, URL or hub reference (``/``,
    ``\\``, ``:``) under a key that names a model, backbone, file or the like (wrappers
    such as ``timm_wrapper`` hand ``hf-hub:`` or ``local-dir:`` names to timm), and ``model_args`` that
    :func:`check_kwargs` would refuse. Keys starting with ``_`` are metadata
    (``_name_or_path``) that building never reads.

    Args:
        config: the config's dict form.
        what: names the model in the message.
        remote_code_ok: ``auto_map`` entries are harmless here (the class is chosen
            by secateurs, and transformers runs remote code only when asked to).
    """
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise SecateursError(f"the transformers config of {what} is malformed (no model_type): re-save the model")

    def refuse(detail: str) -> SecateursError:
        return SecateursError(f"{what} asks for {detail}: load it with trust_code=True (CLI: --trust-code) only if "
                              "you trust where it came from")

    stack: list[Any] = [config]
    while stack:
        item = stack.pop()
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for key, value in pairs:
            key = str(key)
            if key.startswith("_") and key != "_attn_implementation":
                continue
            if key in ("auto_map", "trust_remote_code") and value and not remote_code_ok:
                raise refuse(f"remote code ({key})")
            if "attn_implementation" in key and not (value is None or isinstance(value, str)
                                                    and value in _SAFE_ATTENTION):
                raise refuse(f"the attention implementation {str(value)[:60]!r}, which may fetch and run kernels")
            if "pretrained" in key.lower() and value:
                raise refuse(f"pretrained weights ({key}={str(value)[:40]!r}), which would be downloaded")
            if key == "model_args" and isinstance(value, dict):  # timm_wrapper's options for timm.create_model
                check_kwargs({"kind": "timm", "name": str(item.get("architecture", "?"))[:60]}, value)
            if key == "auto_map":
                continue  # class names for remote code, which is never asked for here
            if isinstance(value, str) and _NAMES_SOMETHING.search(key) and re.search(r"[/\\:]", value):
                raise refuse(f"{key}={value[:60]!r}, which names a file, URL or hub model")
            if isinstance(value, (dict, list)):
                stack.append(value)


def check_source(source: Any, *, trust_code: bool) -> None:
    """Refuse, before any import, a source that would run code the user did not opt into."""
    if not isinstance(source, dict):
        raise SecateursError("the architecture record in the manifest is malformed: re-save the model")
    kind = source.get("kind")
    if kind not in ("torchvision", "timm", "factory", "hf"):
        raise SecateursError(f"unknown architecture kind {str(kind)[:40]!r} in the manifest: re-save the model")
    if kind == "factory":
        target = source.get("target")
        if not isinstance(target, str) or target.count(":") != 1 or not all(
            part.isidentifier() for part in target.replace(":", ".").split(".")
        ):
            raise SecateursError(f"the manifest's factory {str(target)[:60]!r} is not 'package.module:name': "
                                 "re-save the model")
    if trust_code:
        return
    if kind == "factory":
        module, _, name = source["target"].partition(":")
        if module != ZOO_MODULE or "." in name:
            raise SecateursError(
                f"the model folder asks to import and run '{source['target']}' to rebuild the model: "
                "load it with trust_code=True (CLI: --trust-code) only if you trust where it came from"
            )
        check_kwargs(source, source.get("kwargs", {}))
    elif kind in ("torchvision", "timm"):
        _check_name(source, "name")
        check_kwargs(source, source.get("kwargs", {}))
    else:
        _check_name(source, "class")
        check_hf_config(source.get("config"), "the model folder's transformers config")


def module_budget_for(tensors: int | None) -> int:
    """How many submodules a model with ``tensors`` stored tensors may construct.

    Every layer type we know has fewer than two modules per stored tensor; the
    factor 16 leaves room for parameter-free modules and for blocks a layer
    pruning removed after the build. Unknown: a generous fixed bound.
    """
    return 200_000 if tensors is None else 16 * tensors + 1_000


@contextlib.contextmanager
def module_budget(limit: int, what: str) -> Iterator[None]:
    """Stop a constructor that registers more than ``limit`` submodules.

    A config or constructor option can ask for millions of layers; even on the
    meta device their Python objects alone take gigabytes before any size check
    could compare them with the weights.
    """
    import torch

    count = 0

    def count_one(module: Any, name: str, submodule: Any) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise SecateursError(f"{what} builds more than {limit:,} modules, far more than its weights hold: "
                                 "it was edited or is not a model; load it with trust_code=True (CLI: "
                                 "--trust-code) only if you trust where it came from")

    handle = torch.nn.modules.module.register_module_module_registration_hook(count_one)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No Hub access while the block runs (defence in depth: the policy already refuses what would fetch)."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = None
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants
    old_flag = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = old_flag
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
