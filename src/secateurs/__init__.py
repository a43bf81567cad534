"""secateurs: prune PyTorch models for real.

Importing this package pulls in only torch, safetensors and the standard
library; optional integrations (torchvision, timm, transformers, matplotlib,
onnx) are imported inside the functions that need them.
"""

from .analysis import LayerStats, ModelStats, analyze
from .data.text import perplexity, token_batches
from .errors import SecateursError
from .io.checkpoint import load, read_manifest, save
from .io.export import export_model
from .io.inputs import example_inputs
from .io.specs import load_model, load_tokenizer
from .masks import finalize_, get_mask
from .methods import (
    NM,
    Channels,
    LayerReport,
    Layers,
    PruneReport,
    SparseGPT,
    Unstructured,
    Wanda,
    prune_,
    register_method,
)
from .methods.sensitivity import sensitivity
from .semi_structured import (
    SemiStructuredLayer,
    SemiStructuredReport,
    restore_dense_,
    semi_structured_,
)
from .train import AGP, FinetuneConfig, GroupLassoRegularizer, SlimmingRegularizer, finetune
from .train.iterative import prune_and_finetune_
from .version import __version__

__all__ = [
    "export_model",
    "load_tokenizer",
    "perplexity",
    "sensitivity",
    "token_batches",
    "AGP",
    "FinetuneConfig",
    "GroupLassoRegularizer",
    "SlimmingRegularizer",
    "finetune",
    "Channels",
    "NM",
    "LayerReport",
    "Layers",
    "LayerStats",
    "ModelStats",
    "PruneReport",
    "SecateursError",
    "SemiStructuredLayer",
    "SemiStructuredReport",
    "SparseGPT",
    "Unstructured",
    "Wanda",
    "__version__",
    "analyze",
    "example_inputs",
    "finalize_",
    "get_mask",
    "load",
    "load_model",
    "prune_",
    "prune_and_finetune_",
    "read_manifest",
    "register_method",
    "restore_dense_",
    "save",
    "semi_structured_",
]
