"""One loader for every ``MODEL`` argument, shared by the CLI and the Python API."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SecateursError
from ..utils import first_line
from .arch import attach_source, build, parse_arch, require
from .checkpoint import is_saved_model, load
from .hf import (
    check_hf_sizes,
    hf_class,
    hf_skeleton,
    hf_stored_elements,
    load_hf,
    quiet_transformers,
)
from .policy import is_plain_file_name, offline

log = logging.getLogger(__name__)

# check_hf_sizes ... quiet_transformers live in .hf (transformers folders) and are re-exported here
__all__ = ["check_hf_sizes", "hf_class", "hf_skeleton", "hf_stored_elements", "load_hf", "load_model",
           "load_state_dict_file", "load_tokenizer", "quiet_transformers", "sentence_transformers_files",
           "ultralytics_model", "SPEC_HELP"]

SPEC_HELP = (
    "use torchvision:NAME, timm:NAME, ultralytics:NAME.yaml, hf:PATH (folder or .gguf), a secateurs model "
    "directory, a .pt/.pth/.safetensors state dict with --arch SPEC, or package.module:factory"
)
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling objects.

    Checkpoints that nest the weights under ``state_dict``/``model`` and keys
    prefixed with ``module.`` (DistributedDataParallel) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise SecateursError(f"weights file '{path}' does not exist: check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors' own error types for corrupt files
            raise SecateursError(f"'{path}' is not a readable safetensors file ({first_line(exc)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SecateursError(
            f"'{path}' holds pickled Python objects, not just tensors: load it as MODEL with "
            "--trust-pickle if you trust its author"
        ) from None
    except Exception as exc:
        raise SecateursError(f"cannot read '{path}' as a torch file ({first_line(exc)})") from None
    for key in _NESTED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise SecateursError(f"'{path}' does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _load_weights_into(model: nn.Module, path: str | os.PathLike[str]) -> None:
    state = load_state_dict_file(path)

    def kind(dtype: torch.dtype) -> str:
        return "complex" if dtype.is_complex else "floating-point" if dtype.is_floating_point else "integer"

    # load_state_dict copies int64 into a float32 parameter (or drops the imaginary part) without a word:
    # a tensor of another kind is a damaged or foreign file, not weights to convert
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and kind(v.dtype) != kind(own[k].dtype)]
    if wrong:
        first = wrong[0]
        raise SecateursError(
            f"weights in '{path}' store '{first}' as {str(state[first].dtype).removeprefix('torch.')}, but the "
            f"architecture's is {kind(own[first].dtype)} ({str(own[first].dtype).removeprefix('torch.')})"
            + (f", and {len(wrong) - 1} more tensors differ in kind" if len(wrong) > 1 else "")
            + ": convert the file's tensors to the parameters' dtypes, or check --arch"
        )
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes (e.g. another number of classes)
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), first_line(exc))
        raise SecateursError(f"weights in '{path}' do not fit the architecture ({detail}): "
                             "check --arch and its options (e.g. the number of classes)") from None
    if result.missing_keys or result.unexpected_keys:
        raise SecateursError(
            f"weights in '{path}' do not match the architecture: {len(result.missing_keys)} missing "
            f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:2]}); check --arch"
        )


def load_tokenizer(spec: str) -> Any:
    """The tokenizer that ships with an ``hf:`` model (a folder, or the ``.gguf`` file itself)."""
    transformers = require("transformers", "hf")
    target = Path(spec[3:] if spec.startswith("hf:") else spec)
    try:
        with offline():  # never custom tokenizer code, never the Hub (transformers would otherwise ask on a tty)
            if target.suffix == ".gguf" and target.is_file():
                return transformers.AutoTokenizer.from_pretrained(str(target.parent), gguf_file=target.name,
                                                                  local_files_only=True, trust_remote_code=False)
            if (target / "config.json").is_file() or (target / "tokenizer_config.json").is_file():
                return transformers.AutoTokenizer.from_pretrained(str(target), local_files_only=True,
                                                                  trust_remote_code=False)
    except Exception as exc:  # a damaged tokenizer_config.json fails with any error type
        raise SecateursError(f"cannot load the tokenizer of '{spec}' ({first_line(exc)})") from None
    raise SecateursError(f"text data needs the model's tokenizer: give the model as hf:FOLDER, a .gguf file, "
                         f"or a folder pruned from one; '{spec}' has none")


SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
MAX_COMPANION_BYTES = 64 * 2**20  # a module's files (a Dense head's weights at most)


def sentence_transformers_files(spec: str, model: nn.Module) -> dict[str, bytes]:
    """The sentence-transformers files of the folder ``spec`` names (``modules.json``, its configs and module
    folders such as ``1_Pooling``), to save beside the pruned ``model`` so ``SentenceTransformer(DIR)`` loads
    it too. Empty for other models, and (with a warning) when a module's width no longer fits the model's
    hidden size or the files are not plain files inside the folder."""
    import json

    folder = Path(spec[3:] if spec.startswith("hf:") else spec)
    if not (folder / "modules.json").is_file():
        return {}

    def skip(why: str) -> dict[str, bytes]:
        log.warning("the sentence-transformers files of '%s' are not copied: %s", folder, why)
        return {}

    def read(path: Path) -> bytes | None:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_COMPANION_BYTES:
            return None
        return path.read_bytes()

    try:
        modules = json.loads((folder / "modules.json").read_bytes())
    except (ValueError, RecursionError):
        return skip("modules.json is not valid JSON")
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("path"), str)
                                                for m in modules):
        return skip("modules.json is not a list of modules with paths")
    out: dict[str, bytes] = {}
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (folder / name).exists() or (folder / name).is_symlink():
            data = read(folder / name)
            if data is None:
                return skip(f"{name} is not a plain file of at most {MAX_COMPANION_BYTES >> 20} MiB")
            out[name] = data
    for module in modules:
        sub = module["path"]
        if not sub:
            continue  # the transformer itself: the model we save
        if not is_plain_file_name(sub) or (folder / sub).is_symlink():
            return skip(f"module path {sub[:80]!r} is not a folder inside it")
        if not (folder / sub).is_dir():
            continue  # e.g. Normalize, which keeps no files
        for entry in sorted((folder / sub).iterdir()):
            data = read(entry)
            if data is None:
                return skip(f"'{sub}/{entry.name}' is not a plain file of at most {MAX_COMPANION_BYTES >> 20} MiB")
            out[f"{sub}/{entry.name}"] = data
    # the first module after the transformer reads its output: Pooling's width (named by sentence-transformers
    # before and since 6.x), or a Dense head's input features, must be the model's hidden size
    configs = {}
    for name in (n for n in out if n.endswith("/config.json")):
        try:
            configs[name] = json.loads(out[name])
        except (ValueError, RecursionError):
            return skip(f"'{name}' is not valid JSON")
    first = next((m["path"] for m in modules if m["path"]), None)
    config = configs.get(f"{first}/config.json")
    if config is not None:
        config = config if isinstance(config, dict) else {}
        width = next((config[k] for k in ("word_embedding_dimension", "embedding_dimension", "in_features")
                      if k in config), None)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if width is not None and hidden is not None and width != hidden:
            return skip(f"its {first} module reads {width} channels, but the model's hidden size is now {hidden}")
    return out


# ultralytics' model classes by the task its yaml names (guessed from the file name: yolov8n-seg.yaml)
_ULTRALYTICS_CLASSES = {"detect": "DetectionModel", "segment": "SegmentationModel", "pose": "PoseModel",
                        "obb": "OBBModel", "classify": "ClassificationModel"}


def ultralytics_model(cfg: str, nc: int | None = None) -> nn.Module:
    """An ultralytics YOLO model built from its yaml, with random weights; nothing is downloaded.

    Args:
        cfg: a yaml ultralytics ships (``yolov8n.yaml``, ``yolo11s-seg.yaml``: the scale letter picks
            the size) or the path of one.
        nc: the number of classes, if not the yaml's.

    Example:
        >>> # skipped by the doctests: ultralytics takes seconds to import; tests/test_detection.py builds it
        >>> model = ultralytics_model("yolov8n.yaml")  # doctest: +SKIP
        >>> type(model).__name__  # doctest: +SKIP
        'DetectionModel'
    """
    import io

    if not isinstance(cfg, str) or not cfg.endswith((".yaml", ".yml")):
        raise SecateursError(f"ultralytics:{cfg} is not a model yaml: name one like ultralytics:yolov8n.yaml "
                             "(ultralytics' .pt files are pickles: give their weights as a state dict with --weights)")
    with contextlib.redirect_stdout(io.StringIO()):  # ultralytics prints its settings banner on first import
        tasks = require("ultralytics.nn.tasks", "detect")
    cls = getattr(tasks, _ULTRALYTICS_CLASSES.get(tasks.guess_model_task(cfg), "DetectionModel"))
    # the constructor runs a forward to find the strides: under torch.device("meta") (a rebuild check) it
    # is built on the CPU and moved
    on_meta = torch.empty(0).is_meta
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), \
                torch.device("cpu") if on_meta else contextlib.nullcontext():
            warnings.simplefilter("ignore")
            model = cls(cfg, nc=nc, verbose=False)
    except FileNotFoundError:
        raise SecateursError(f"ultralytics has no model yaml '{cfg}' and no such file exists: name one it ships "
                             "(yolov8n.yaml, yolo11n.yaml, ...) or give the path of a yaml") from None
    if on_meta:
        model = model.to("meta")
    kwargs: dict[str, Any] = {"cfg": cfg} | ({"nc": nc} if nc is not None else {})
    return attach_source(model, {"kind": "factory", "target": "secateurs.io.specs:ultralytics_model",
                                 "kwargs": kwargs})


def _load_pickled(path: Path, arch: str | None) -> nn.Module:
    """Unpickle a whole model (trusted files only); ``arch`` is recorded as its rebuild recipe."""
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SecateursError(f"cannot unpickle '{path}' ({first_line(exc)})") from None
    if isinstance(obj, nn.Module):
        return obj if arch is None else attach_source(obj, parse_arch(arch))
    if arch is not None:  # a plain checkpoint after all
        model = build(parse_arch(arch))
        _load_weights_into(model, path)
        return model
    raise SecateursError(
        f"'{path}' holds a {type(obj).__name__}, not a whole model: pass --arch SPEC to load it as weights"
    )


def load_model(
    spec: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
) -> nn.Module:
    """Load a model from a spec string.

    Args:
        spec: ``torchvision:NAME`` (random weights unless ``weights`` is given;
            every task: classification, segmentation, detection, video, optical
            flow), ``timm:NAME``, ``ultralytics:NAME.yaml`` (a YOLO model from
            its yaml, see :func:`ultralytics_model`), ``hf:PATH`` (a transformers
            folder or ``.gguf`` file), a directory saved by secateurs, a
            ``.pt``/``.pth``/``.safetensors`` state dict (with ``arch``), or
            ``package.module:factory``.
        weights: a state-dict file to load into an architecture spec.
        arch: the architecture for a bare state-dict file.
        trust_pickle: allow unpickling a whole model from a torch file. Only for
            files you trust: unpickling runs arbitrary code. With ``arch``, that
            spec is recorded as the recipe to rebuild the model when saving it.
        trust_code: let a model folder run code it names: a secateurs manifest's
            factory outside the allow-list of :mod:`secateurs.io.policy` (see
            :func:`secateurs.load`), a transformers folder's remote code or Hub kernels.

    Returns:
        The model (torchvision/timm/factory models in their constructed mode,
        secateurs and transformers models in eval mode), with its source recorded
        so :func:`secateurs.save` can rebuild it.

    Example:
        >>> import secateurs
        >>> model = secateurs.load_model("secateurs.zoo:DigitsCNN")
        >>> type(model).__name__
        'DigitsCNN'
    """
    if not spec:
        raise SecateursError(f"empty model spec: {SPEC_HELP}")
    path = Path(spec)
    start = time.perf_counter()
    model = _load_model(spec, path, arch=arch, trust_pickle=trust_pickle, trust_code=trust_code)
    if weights is not None:
        _load_weights_into(model, weights)
    seconds = time.perf_counter() - start
    # transformers shows its own bars while it loads; the line says when loading ends and what it cost
    log.log(logging.INFO if seconds > 5 else logging.DEBUG, "loaded %s in %.1f s", spec, seconds)
    return model


def _load_model(spec: str, path: Path, *, arch: str | None, trust_pickle: bool, trust_code: bool) -> nn.Module:
    if spec.startswith("hf:"):
        model = load_hf(spec[3:], trust_code=trust_code)
    elif spec.startswith("ultralytics:"):
        try:
            model = ultralytics_model(spec.split(":", 1)[1])
        except SecateursError:
            raise
        except Exception as exc:  # a yaml of the wrong shape fails anywhere in ultralytics' model parser
            raise SecateursError(f"ultralytics cannot build '{spec}' ({first_line(exc)}): check the yaml") from None
    elif path.is_dir():
        if is_saved_model(path):
            model = load(path, trust_code=trust_code)
        elif (path / "config.json").is_file():
            model = load_hf(spec, trust_code=trust_code)
        else:
            raise SecateursError(f"directory '{spec}' is neither a secateurs model nor a transformers folder")
    elif path.suffix in STATE_DICT_SUFFIXES or path.suffix == ".gguf":
        if not path.is_file():
            raise SecateursError(f"model file '{spec}' does not exist: check the path")
        if path.suffix == ".gguf":
            model = load_hf(spec)
        elif trust_pickle and path.suffix != ".safetensors":
            model = _load_pickled(path, arch)
        elif arch is not None:
            model = build(parse_arch(arch))
            _load_weights_into(model, path)
        else:
            load_state_dict_file(path)  # raises a precise error for pickled models
            raise SecateursError(f"'{spec}' holds only weights: pass --arch SPEC (e.g. torchvision:resnet18)")
    else:
        try:
            source = parse_arch(spec)
        except SecateursError:
            if os.sep in spec or spec.startswith("."):
                raise SecateursError(f"model path '{spec}' does not exist: check the path") from None
            raise SecateursError(f"unknown model spec '{spec}': {SPEC_HELP}") from None
        model = build(source)
    return model
