"""Transformers folders and GGUF files: the checks before anything loads, loading, and a quiet transformers.

An untrusted folder is data: its config must name a transformers class, its files must be plain
files inside it, and its config must not ask for more weights than the files hold (transformers
would fill the rest with fresh random values). :mod:`.specs` (every ``MODEL`` argument),
:mod:`.checkpoint` (secateurs' transformers layout), :mod:`.compressed` and streaming pruning
load through these.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SecateursError
from ..utils import first_line
from .arch import attach_source, require
from .policy import is_plain_file_name, module_budget, module_budget_for, offline

log = logging.getLogger(__name__)

__all__ = ["check_hf_folder", "check_hf_sizes", "forget_gguf", "hf_class", "hf_skeleton", "hf_stored_elements",
           "load_hf", "quiet_transformers"]


def hf_class(transformers: Any, path: Path, trust_code: bool) -> Any:
    """The model class a transformers folder's config.json names, checked before anything is loaded."""
    import json

    from .policy import check_depth, check_hf_config

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise SecateursError(f"'{path}' is not a transformers model folder (no config.json): check the path")
    try:
        config = json.loads(cfg_path.read_bytes())
        check_depth(config)
    except (ValueError, RecursionError) as exc:
        raise SecateursError(f"'{cfg_path}' is not a valid config ({first_line(exc)}): check the folder") from None
    if not trust_code:
        check_hf_config(config, f"'{cfg_path}'", remote_code_ok=True)
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise SecateursError(f"'{cfg_path}' has a malformed 'architectures' list: check the folder")
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None and archs:
        raise SecateursError(f"'{cfg_path}' names the architecture {archs[0]}, which this transformers "
                             f"({transformers.__version__}) does not have: upgrade transformers (models that need "
                             "their own code are not loaded)")
    if cls is None:
        log.warning("'%s' names no architecture: loading it as the base model (AutoModel), without a task head",
                    cfg_path)
        return transformers.AutoModel
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SecateursError(f"'{cfg_path}' names {archs[0]}, which is not a transformers model class")
    return cls


def hf_stored_elements(path: Path) -> int:
    """Check that a transformers folder's files are plain files inside it; return an upper bound of the
    number of weight elements they hold (safetensors headers; a pickle-free ``.bin`` holds at most one
    element per byte).

    Symlinks are accepted only in the Hugging Face cache's own layout
    (``snapshots/REV/file`` -> ``../../blobs/HASH``, ``blobs`` a real folder).
    """
    import json

    from safetensors import safe_open

    blobs = path.parent.parent / "blobs"
    cache_blobs = blobs.resolve() if path.parent.name == "snapshots" and blobs.is_dir() and not blobs.is_symlink() \
        else None
    for entry in path.iterdir():
        if entry.is_symlink() and (cache_blobs is None or entry.resolve().parent != cache_blobs):
            raise SecateursError(f"'{entry}' is a symlink: copy the real file into the folder (a model folder must "
                                 "not read files outside itself)")
    names = {p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin")}
    for index in (path / "model.safetensors.index.json", path / "pytorch_model.bin.index.json"):
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_bytes()).get("weight_map")
        except (ValueError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SecateursError(f"'{index}' is not a valid index (no weight_map of file names): check the folder")
        names |= set(weight_map.values())
    total = 0
    for name in sorted(names):
        file = path / name
        if not is_plain_file_name(name):
            raise SecateursError(f"the folder '{path}' names the weights file {name[:80]!r}, which is not a file "
                                 "name inside it: check the folder")
        if not file.is_file():
            raise SecateursError(f"the weights file '{file}' is missing: check the folder")
        if file.suffix != ".safetensors":
            total += file.stat().st_size
            continue
        try:
            with safe_open(str(file), framework="pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        except Exception as exc:  # safetensors' own error types for damaged files
            raise SecateursError(f"the weights file '{file}' is damaged ({first_line(exc)}): check the folder") from None
    return total


def check_hf_sizes(transformers: Any, cls: Any, config: Any, stored: int, what: str) -> None:
    """Build ``cls(config)`` on the meta device and refuse a config that asks for far more weights than the
    files hold: transformers would fill the rest with fresh random values, gigabytes of them if the
    config says so."""
    try:
        with torch.device("meta"), module_budget(module_budget_for(None), what), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls(config)
    except SecateursError:
        raise
    except Exception as exc:
        raise SecateursError(f"cannot build {what} from its config ({first_line(exc)}): check the folder") from None
    needed = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if needed > stored * 1.01 + 2**20:  # a missing head or norm may be initialised, not a model's worth
        raise SecateursError(f"the config of {what} asks for {needed:,} weights, but its files hold at most "
                             f"{stored:,}: the model is incomplete or its config was edited")


def check_hf_folder(transformers: Any, cls: Any, path: Path) -> None:
    """An untrusted transformers folder: only its own files, and a config no larger than its weights."""
    what = f"the folder '{path}'"
    stored = hf_stored_elements(path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        if cls is transformers.AutoModel:
            cls = transformers.AutoModel._model_mapping[type(config)]
    except Exception as exc:
        raise SecateursError(f"cannot read the config of {what} ({first_line(exc)}): check the folder") from None
    check_hf_sizes(transformers, cls, config, stored, what)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports on stderr while we load or save: our own one-line messages say
    what failed."""
    logging_ = require("transformers", "hf").utils.logging
    level = logging_.get_verbosity()
    bars = logging_.is_progress_bar_enabled()
    logging_.set_verbosity_error()
    logging_.disable_progress_bar()
    try:
        yield
    finally:
        logging_.set_verbosity(level)
        if bars:
            logging_.enable_progress_bar()


def load_hf(target: str | os.PathLike[str], *, trust_code: bool = False) -> nn.Module:
    """A transformers folder or GGUF file, checked as :func:`~secateurs.io.specs.load_model` checks ``hf:`` specs (eval mode)."""
    transformers = require("transformers", "hf")
    path = Path(target)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SecateursError(f"GGUF file '{path}' does not exist: check the path")
        gguf = require("gguf", "hf")
        what = f"the GGUF file '{path}'"
        try:
            tensors = gguf.GGUFReader(str(path)).tensors
            stored: int | None = sum(int(t.n_elements) for t in tensors)
        except Exception:  # damaged: transformers' own reader says how, below
            tensors, stored = [], None
        try:
            with offline(), quiet_transformers(), module_budget(module_budget_for(len(tensors) or None),
                                                                             what):
                if stored is not None:
                    config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                     local_files_only=True)
                    check_hf_sizes(transformers, transformers.AutoModelForCausalLM._model_mapping[type(config)],
                                    config, stored, what)
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, local_files_only=True, trust_remote_code=False
                )
        except SecateursError:
            raise
        except (OSError, ValueError) as exc:
            raise SecateursError(f"cannot load GGUF '{path}' ({first_line(exc)})") from None
        except Exception as exc:
            # the GGUF reader parses with struct and numpy: a cut or damaged file fails with whatever it
            # hit first (struct.error, IndexError, KeyError, ...)
            raise SecateursError(f"cannot read GGUF '{path}' ({first_line(exc)}): the file is truncated or "
                                 "damaged; download or convert it again") from None
        forget_gguf(model)
    else:
        cls = hf_class(transformers, path, trust_code)
        try:
            with quiet_transformers(), contextlib.nullcontext() if trust_code else offline():
                if not trust_code:
                    check_hf_folder(transformers, cls, path)
                model = cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_code)
        except SecateursError:
            raise
        except pickle.UnpicklingError:
            raise SecateursError(f"the weights in '{path}' hold pickled Python objects, not just tensors: "
                                 "convert them to safetensors with a tool you trust") from None
        except Exception as exc:  # transformers and safetensors raise many types for damaged folders
            raise SecateursError(f"cannot load transformers model '{path}' ({first_line(exc)}): "
                                 "check that the folder's files are complete") from None
    source = {"kind": "hf", "class": type(model).__name__, "config": model.config.to_dict()}
    return attach_source(model.eval(), source)


def hf_skeleton(target: str | os.PathLike[str], *, trust_code: bool = False,
                dtype: torch.dtype | None = None, stored: Collection[str] | None = None) -> nn.Module:
    """The model a transformers folder describes, with every weight on the meta device.

    The folder is checked as :func:`load_hf` checks it (config, architecture,
    files, sizes), but no weight is read: parameters and the buffers the
    checkpoint stores stay on the meta device for the caller to fill one layer at
    a time, while buffers a model computes in its constructor (rotary tables)
    are real, computed as ``from_pretrained`` would with ``dtype`` as the default.
    Weights the model ties (an output head sharing the embeddings) are tied as
    ``from_pretrained`` ties them given the names the checkpoint ``stored``.
    """
    transformers = require("transformers", "hf")
    accelerate = require("accelerate", "hf")
    path = Path(target)
    cls = hf_class(transformers, path, trust_code)
    what = f"the folder '{path}'"
    try:
        with quiet_transformers(), contextlib.nullcontext() if trust_code else offline():
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                             trust_remote_code=trust_code)
            if cls is transformers.AutoModel:
                cls = transformers.AutoModel._model_mapping[type(config)]
            if not trust_code:
                check_hf_sizes(transformers, cls, config, hf_stored_elements(path), what)
            default = torch.get_default_dtype()
            if dtype is not None and dtype.is_floating_point:
                torch.set_default_dtype(dtype)
            try:
                with accelerate.init_empty_weights(include_buffers=False), warnings.catch_warnings(), \
                        module_budget(module_budget_for(None), what):
                    warnings.simplefilter("ignore")
                    model = cls(config)
            finally:
                torch.set_default_dtype(default)
            if stored is not None:  # tie as from_pretrained does (a tied head is stored once), outside
                # init_empty_weights, which would turn the shared parameter into a new one
                model.tie_weights(missing_keys=set(model.state_dict()) - set(stored))
    except SecateursError:
        raise
    except Exception as exc:
        raise SecateursError(f"cannot build {what} from its config ({first_line(exc)}): check the folder") from None
    source = {"kind": "hf", "class": type(model).__name__, "config": model.config.to_dict()}
    return attach_source(model.eval(), source)


def forget_gguf(model: nn.Module) -> None:
    """A GGUF model is de-quantized on load, but transformers still marks it quantized and refuses
    ``save_pretrained``: drop the marks, so it is saved as a normal transformers model in its own dtype."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
