"""How to rebuild a model's architecture without pickle.

A *source* is a small JSON-able dict recorded on a model when we load it and
written into a saved model's manifest (recorded and read by
:mod:`secateurs.provenance`; its helpers are re-exported here):

- ``{"kind": "torchvision", "name": "resnet18"}``
- ``{"kind": "timm", "name": "resnet18"}``
- ``{"kind": "factory", "target": "package.module:callable"}``
- ``{"kind": "hf", "class": "LlamaForCausalLM", "config": {...}}``
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from ..errors import SecateursError
from ..masks import effective_state_dict
from ..provenance import SOURCE_ATTR, STRUCTURE_ATTR, attach_source, describe, parse_arch, source_of
from ..surgery import Plan, apply_plan_
from ..utils import first_line
from .policy import check_kwargs, check_source

__all__ = [
    "BuildError", "SOURCE_ATTR", "attach_source", "build", "build_pruned", "check_rebuildable", "describe", "parse_arch", "require", "source_of",
]


def require(module: str, extra: str) -> Any:
    """Import an optional dependency or fail with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SecateursError(
            f"this needs the optional package '{module.split('.')[0]}' ({first_line(exc)}): "
            f"pip install 'secateurs[{extra}]'"
        ) from None


def _resolve(target: str) -> Any:
    mod_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SecateursError(
            f"cannot import '{mod_name}' for '{target}' ({first_line(exc)}): check PYTHONPATH"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SecateursError(f"'{mod_name}' has no attribute '{attr}' (from '{target}')") from None
    return obj


class BuildError(SecateursError):
    """The architecture's own constructor failed (on the meta device that may only mean it needs real tensors)."""


def _torchvision_model(tv: Any, name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        builder = tv.get_model_builder(name)
    except ValueError:
        raise SecateursError(f"torchvision has no model '{name}': see torchvision.models.list_models()") from None
    # detection and segmentation builders fetch backbone weights unless told not to
    no_download = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
    return builder(**({"weights": None} | no_download | kwargs))


def build(source: dict[str, Any], *, trust_code: bool = True) -> nn.Module:
    """Build a freshly initialised model from a source dict.

    Args:
        source: the recipe (see the module docstring).
        trust_code: allow any ``factory`` and any constructor keywords. A manifest
            from someone else could name any importable module (``os:system``), so
            :func:`secateurs.load` passes False unless told otherwise: then only the
            builders :mod:`secateurs.io.policy` allows are imported and called.
    """
    check_source(source, trust_code=trust_code)
    kind = source["kind"]
    kwargs = source.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise SecateursError("the architecture kwargs in the manifest are malformed: re-save the model")
    try:
        if kind == "torchvision":
            model = _torchvision_model(require("torchvision.models", "vision"), source["name"], kwargs)
        elif kind == "timm":
            timm = require("timm", "vision")
            name = source["name"]
            if not timm.is_model(name):
                raise SecateursError(f"timm has no model '{name}': see timm.list_models()")
            model = timm.create_model(name, pretrained=False, **kwargs)
        elif kind == "factory":
            target = source["target"]
            fn = _resolve(target)
            if not callable(fn):
                raise SecateursError(f"'{target}' is not callable: point at a factory function or class")
            if not trust_code:
                if not (isinstance(fn, type) and issubclass(fn, nn.Module)):
                    raise SecateursError(f"'{target}' is not a model class: load it with trust_code=True "
                                         "(CLI: --trust-code) only if you trust where it came from")
                check_kwargs(source, kwargs, allowed=set(inspect.signature(fn).parameters))
            try:
                model = fn(**kwargs)
            except TypeError as exc:
                raise SecateursError(
                    f"calling '{target}' failed ({first_line(exc)}): point at a factory that needs no arguments"
                ) from None
            if not isinstance(model, nn.Module):
                raise SecateursError(f"'{target}' returned {type(model).__name__}, not a torch.nn.Module")
        else:
            model = _hf_model(source)
    except SecateursError:
        raise
    except KeyError as exc:
        raise SecateursError(f"the architecture record lacks {exc}: re-save the model") from None
    except Exception as exc:  # the builder refused its options (a wrong type, an impossible size)
        raise BuildError(f"building {describe(source)} failed ({first_line(exc)}): check its options "
                             "(or re-save the model)") from exc
    return attach_source(model, source)


def _hf_model(source: dict[str, Any]) -> nn.Module:
    transformers = require("transformers", "hf")
    cfg = dict(source["config"])
    cls = getattr(transformers, source["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SecateursError(
            f"transformers has no model class {source['class']}: install the version the model was saved with"
        )
    model_type = cfg.pop("model_type", None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **cfg)
    except (ValueError, TypeError, KeyError) as exc:
        raise SecateursError(f"transformers cannot make a {model_type!r} config from the manifest "
                             f"({first_line(exc)}): install the version the model was saved with") from None
    wanted = getattr(cls, "config_class", None)
    if isinstance(wanted, type) and not isinstance(config, wanted):
        raise SecateursError(f"{source['class']} takes a {wanted.__name__}, but the manifest's config is a "
                             f"{type(config).__name__}: re-save the model")
    return cls(config)


def build_pruned(source: dict[str, Any], structure: list[Any], *, trust_code: bool = True) -> nn.Module:
    """Build the architecture, then replay the structural pruning plans on it.

    Args:
        source: the recipe (see the module docstring).
        structure: the plans, as :class:`~secateurs.surgery.Plan` or their dict form
            (checked before anything is built).
        trust_code: see :func:`build`.
    """
    plans = [plan if isinstance(plan, Plan) else Plan.from_dict(plan) for plan in structure]
    model = build(source, trust_code=trust_code)
    for i, plan in enumerate(plans):
        if plan.is_empty():
            continue
        try:
            apply_plan_(model, plan)
        except SecateursError as exc:
            raise SecateursError(f"structural plan {i + 1} in the manifest does not fit the architecture ({exc}): "
                                 "re-save the model") from None
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise SecateursError(f"structural plan {i + 1} in the manifest does not fit the architecture "
                                 f"({first_line(exc)}): re-save the model") from None
    setattr(model, STRUCTURE_ATTR, [plan.to_dict() for plan in plans if not plan.is_empty()])
    return model


def check_rebuildable(model: nn.Module, source: dict[str, Any]) -> None:
    """Refuse a source that would not rebuild ``model``'s architecture.

    Builds the source on the meta device (no memory, no init cost) and compares
    every state-dict key and shape with the model's.
    """
    structure = getattr(model, STRUCTURE_ATTR, [])
    try:
        try:
            with torch.device("meta"):
                fresh = build_pruned(source, structure)
        except SecateursError:
            raise
        except Exception:  # some factories cannot run on meta tensors; build for real
            fresh = build_pruned(source, structure)
    except SecateursError as exc:
        raise SecateursError(f"cannot record how to rebuild the model ({exc})") from None
    want = {k: tuple(v.shape) for k, v in effective_state_dict(model)[0].items()}
    have = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        raise SecateursError(
            f"{describe(source)} does not rebuild this model (differs at {diff[:2]}): "
            "pass arch='package.module:factory' (CLI: --arch) naming a callable that builds it"
        )
