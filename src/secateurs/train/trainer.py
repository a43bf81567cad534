"""Recovery fine-tuning: knowledge distillation, cosine LR, AMP, checkpoints, resume, torchrun.

One function, :func:`finetune`, trains a (pruned) classifier on any map-style
dataset or DataLoader of ``(inputs, label)``, or a language model on token
batches (``{"input_ids": ...}``, e.g. from
:func:`secateurs.data.text.token_batches`): next-token prediction for causal
LMs, masked tokens (:class:`secateurs.data.text.MaskedTokens`) for masked LMs.
The same call runs unchanged under ``torchrun --nproc_per_node N``: it then
joins the process group (gloo on CPU, nccl on GPU), wraps the model in
PyTorch's DistributedDataParallel (or shards it with FSDP2's ``fully_shard``
when ``fsdp``), shards the data with a DistributedSampler, and only rank 0
writes checkpoints. Nothing distributed is re-implemented here.

Runs are reproducible: the sampler is seeded by ``(seed, epoch)``, and a
checkpoint holds the model (with its masks), optimizer, LR schedule, AMP
scaler, regulariser strength, gradual-pruning state and RNG state, so a
resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset

from ..data.text import MaskedTokens, TokenSequences, generates, lm_loss_sum
from ..errors import SecateursError
from ..graph.blocks import repeated_blocks
from ..importance.stats import split_batch
from ..masks import (
    bake_on_save_pretrained,
    effective_state_dict,
    load_effective_state_,
    masked_tensors,
    plain_name,
)
from ..progress import Progress
from ..selection import call_model
from ..utils import eval_mode, first_line, launch_env, map_tensors
from .regularize import REGULARIZERS, make_regularizer
from .schedule import AGP, GradualPruner

__all__ = ["FinetuneConfig", "FinetuneResult", "evaluate_dataset", "finetune"]

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
_DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DEFAULT_EPOCHS = 4
_DEFAULT_BATCH = {"images": 64, "text": 4}  # all processes together: images, or sequences of tokens


@dataclass(kw_only=True)
class FinetuneConfig:
    """How :func:`finetune` trains.

    Attributes:
        epochs: passes over the training data; default 4, or as many as
            ``max_steps``/``max_tokens`` need when one is set (with both an
            epoch count and a budget, training stops at whichever comes first).
        lr: peak learning rate (default 0.05 for SGD, 1e-3 for AdamW); it
            follows a cosine from ``lr`` to zero over all steps (the budget's
            steps when ``max_steps`` or ``max_tokens`` cuts training short).
        optimizer: ``sgd`` (momentum, Nesterov) or ``adamw``.
        momentum: SGD momentum.
        weight_decay: applied to weights only (not to biases or norm scales).
        batch_size: the global batch, all processes together: images, or
            sequences of tokens; default 64 images, and token batches keep
            their own size (4 sequences for a dataset of single sequences). A
            DataLoader passed in keeps its own. Under torchrun each of N
            processes takes ``batch_size / N`` (a given size must divide
            evenly), so N processes take the same optimizer steps per epoch,
            on the same batch size, as one.
        kd_weight: share of the loss from knowledge distillation, in [0, 1]
            (needs a teacher): ``(1 - w) * task + w * T^2 * KL(teacher || student)``,
            where the task loss is cross-entropy (images) or the language-model
            loss (text), and for text the KL is over the vocabulary, per token.
        kd_temperature: softmax temperature T of distillation.
        label_smoothing: of the cross-entropy.
        regularize: ``bn-l1`` (network slimming) or ``group-lasso``, or None.
        reg_strength: the regulariser's weight.
        reg_growth: added to the strength after every epoch (growing penalty).
        gradual_sparsity: final unstructured sparsity of gradual magnitude
            pruning (AGP cubic schedule) during training, or None.
        gradual_end: fraction of training by which ``gradual_sparsity`` is reached.
        amp: mixed precision (autocast; see ``amp_dtype``); default: on for
            CUDA or when ``amp_dtype`` is named, off on CPU.
        amp_dtype: ``bf16`` or ``fp16`` (float16 losses are scaled with a
            GradScaler); default: fp16 on CUDA, bf16 on CPU.
        gradient_checkpointing: recompute activations in the backward pass
            instead of keeping them (less memory, about a third more compute);
            transformers models only (``gradient_checkpointing_enable``).
        max_steps: stop after this many optimizer steps (in all, across epochs).
        max_tokens: stop after the optimizer step at which this many training
            tokens (all processes together) have been seen; text only.
        eval_every: also evaluate on ``val`` every this many optimizer steps
            (it is always evaluated after each epoch).
        fsdp: shard the parameters, gradients and optimizer state across the
            processes with FSDP2 (``torch.distributed.fsdp.fully_shard``, on
            each block of the model's largest list of identical blocks, then
            on the whole), for models that do not fit one device; needs torchrun.
        device: ``cpu``, ``cuda``, ``cuda:1``...; default: CUDA when available
            (under torchrun, the local rank's GPU).
        seed: seeds the sampler order and the RNG (dropout, augmentation).
        checkpoint_dir: write ``last.pt`` there after every epoch (atomically).
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        progress: show a progress bar on stderr (rank 0 only); None: when the
            ``secateurs`` logger shows INFO (the CLI, unless ``--quiet``).
        num_workers: DataLoader worker processes.
    """

    epochs: int | None = None
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int | None = None
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    label_smoothing: float = 0.0
    regularize: str | None = None
    reg_strength: float = 1e-4
    reg_growth: float = 0.0
    gradual_sparsity: float | None = None
    gradual_end: float = 0.75
    amp: bool | None = None
    amp_dtype: str | None = None
    gradient_checkpointing: bool = False
    max_steps: int | None = None
    max_tokens: int | None = None
    eval_every: int | None = None
    fsdp: bool = False
    device: str | None = None
    seed: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_steps", "max_tokens", "eval_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SecateursError(f"{name} must be a whole number of at least 1, got {value!r}")
        if self.optimizer not in _DEFAULT_LR:
            raise SecateursError(f"unknown optimizer '{self.optimizer}': choose one of {', '.join(_DEFAULT_LR)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise SecateursError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise SecateursError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.kd_temperature <= 0:
            raise SecateursError(f"kd_temperature must be positive, got {self.kd_temperature}")
        if self.regularize is not None and self.regularize not in REGULARIZERS:
            raise SecateursError(f"unknown regulariser '{self.regularize}': choose one of {', '.join(REGULARIZERS)}")
        if self.gradual_sparsity is not None and not 0.0 < self.gradual_sparsity < 1.0:
            raise SecateursError(f"gradual_sparsity must be in (0, 1), got {self.gradual_sparsity}")
        if not 0.0 < self.gradual_end <= 1.0:
            raise SecateursError(f"gradual_end must be in (0, 1], got {self.gradual_end}")
        if self.amp_dtype is not None and self.amp_dtype not in _AMP_DTYPES:
            raise SecateursError(f"unknown amp_dtype '{self.amp_dtype}': choose one of {', '.join(_AMP_DTYPES)}")
        if self.amp_dtype is not None and self.amp is False:
            raise SecateursError("amp_dtype names the autocast type, but amp is off: drop one of them "
                                 "(CLI: --amp-dtype or --no-amp)")
        if self.fsdp and (self.regularize is not None or self.gradual_sparsity is not None):
            raise SecateursError("fsdp shards the weights, which regularize and gradual_sparsity need whole: "
                                 "train without fsdp (DDP under torchrun) for those")
        if self.resume and self.checkpoint_dir is None:
            raise SecateursError("resume needs checkpoint_dir (CLI: --checkpoint-dir, or --out's checkpoints)")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else _DEFAULT_LR[self.optimizer]


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: one ``history`` entry per epoch, every held-out evaluation (``evals``),
    and the final held-out metrics (accuracy and loss for images; loss and perplexity for text)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    # every held-out evaluation, with the optimizer step it followed: after each epoch, every eval_every
    # steps, and for text also at step 0 (before training)
    evals: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    resumed_from: int | None = None  # epochs already done in the checkpoint resumed from

    @property
    def is_main(self) -> bool:
        """True in the process that should write outputs (rank 0)."""
        return self.rank == 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- distributed --------------------------------------------------------------------------


@dataclass
class _World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    created: bool = False  # we initialised the process group and must tear it down

    @property
    def active(self) -> bool:
        return self.size > 1


def _join_world(device_hint: str | None) -> _World:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1)."""
    size = launch_env("WORLD_SIZE", 1)
    if size <= 1 or not dist.is_available():
        return _World()
    local = launch_env("LOCAL_RANK", 0)
    created = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device_hint is None or device_hint.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local)  # one GPU per rank, before NCCL picks one
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return _World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local, created=created)


def _device(config: FinetuneConfig, world: _World) -> torch.device:
    if config.device is not None:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SecateursError("device 'cuda' asked for, but no CUDA GPU is available: use --device cpu")
        if device.type == "cuda" and world.active:
            device = torch.device("cuda", world.local_rank)  # each rank its own GPU, whatever index was named
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", world.local_rank if world.active else torch.cuda.current_device())
    return torch.device("cpu")


# -- data -------------------------------------------------------------------------------------


def _as_dataset(data: Any, what: str) -> tuple[Dataset, dict[str, Any]]:
    """The map-style dataset behind ``data`` and the DataLoader options to keep.

    Token batches (a list of ``{"input_ids": (batch, seq_len)}``) become a
    dataset of single sequences, so that they can be shuffled and sharded.
    """
    options: dict[str, Any] = {}
    if isinstance(data, DataLoader):
        options = {"batch_size": data.batch_size, "collate_fn": data.collate_fn, "num_workers": data.num_workers}
        data = data.dataset
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        raise SecateursError(f"{what} must be a map-style dataset (with __len__ and __getitem__) or a DataLoader "
                             "over one, so that it can be shuffled reproducibly and sharded across processes")
    if len(data) == 0:
        raise SecateursError(f"{what} is empty: check the data path")
    first = data[0]
    if isinstance(first, dict) and isinstance(first.get("input_ids"), Tensor) and first["input_ids"].dim() == 2:
        if options:
            raise SecateursError(f"{what} is a DataLoader over token batches, which would batch them twice: "
                                 "pass the batches themselves (a list, e.g. from token_batches)")
        data = TokenSequences([data[i] for i in range(len(data))])
    return data, options


def _kind(dataset: Dataset) -> str:
    """``text`` for token sequences (dicts with ``input_ids``), ``images`` for ``(inputs, label)`` pairs."""
    first = dataset[0]
    return "text" if isinstance(first, dict) and "input_ids" in first else "images"


def _batch_size(dataset: Dataset, options: dict[str, Any], requested: int | None, default: int) -> int:
    own = dataset.batch_size if isinstance(dataset, (TokenSequences, MaskedTokens)) else None
    return options.get("batch_size") or requested or own or default


def _per_process(batch_size: int, world: _World, given: bool) -> int:
    """Each process's share of the global batch: N processes then take the steps one would.

    A batch size the user gave must split evenly; a default is shared as evenly as it can be
    (at least one item each).
    """
    if world.size == 1:
        return batch_size
    share, rest = divmod(batch_size, world.size)
    if rest or not share:
        if given:
            raise SecateursError(f"batch_size {batch_size} is the global batch, all {world.size} processes "
                                 f"together, and does not split evenly over them: use a multiple of {world.size} "
                                 "(CLI: --batch-size)")
        share = max(1, round(batch_size / world.size))
        log.info("the default batch of %d is shared as %d per process over %d processes (%d in all)",
                 batch_size, share, world.size, share * world.size)
    return share


def _loader(dataset: Dataset, options: dict[str, Any], batch_size: int, config: FinetuneConfig,
            sampler: Any) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=options.get("collate_fn"),
                      num_workers=options.get("num_workers", config.num_workers))


def _to(batch: Any, device: torch.device) -> Any:
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def _logits(out: Any) -> Tensor:
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise SecateursError("finetune trains classifiers: the model must return (batch, classes) logits")
    return logits


# -- language models ------------------------------------------------------------------------


def _model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """What a language model is called with: the labels are ours to score, not the model's."""
    return {k: v for k, v in batch.items() if k != "labels"}


def _call_options(model: nn.Module) -> dict[str, Any]:
    # transformers LMs keep a key/value cache for generation unless told not to: training has no use for it
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _token_logits(out: Any) -> Tensor:
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise SecateursError("text data trains language models: the model must return (batch, tokens, vocabulary) "
                             "logits, as a transformers ...ForCausalLM or ...ForMaskedLM does")
    return logits


def _token_count(batch: dict[str, Tensor]) -> Tensor:
    """Training tokens in a batch: those the attention mask keeps, or all of them."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum().to(torch.float64)
    return torch.tensor(batch["input_ids"].numel(), dtype=torch.float64, device=batch["input_ids"].device)


def _check_objective(model: nn.Module, batch: dict[str, Tensor]) -> None:
    """Masked tokens for a masked LM, plain tokens for a causal one (transformers says which it is)."""
    causal = generates(model)
    name = type(model).__name__
    if causal is False and "labels" not in batch:
        raise SecateursError(f"{name} is a masked language model (it cannot generate): train it on masked tokens, "
                             "secateurs.data.text.MaskedTokens(batches, mask_token_id=tokenizer.mask_token_id, "
                             "vocab_size=len(tokenizer))")
    if causal is True and "labels" in batch:
        raise SecateursError(f"{name} is a causal language model: train it on plain token batches (next-token "
                             "prediction), not on MaskedTokens")


def _first_logits(module: nn.Module, inputs: dict[str, Tensor], options: dict[str, Any], failure: str) -> Tensor:
    """``module``'s token logits on ``inputs`` (eval mode, no gradients); ``failure`` words any error."""
    with torch.no_grad(), eval_mode(module):
        try:
            return _token_logits(module(**inputs, **options))
        except SecateursError:
            raise
        except Exception as exc:
            raise SecateursError(failure.format(first_line(exc))) from None


def _check_text(model: nn.Module, teacher: nn.Module | None, batch: dict[str, Tensor],
                options: dict[str, Any], teacher_options: dict[str, Any]) -> None:
    """One forward of the model (and teacher) on the first batch: vocabulary logits, the same vocabulary."""
    inputs = _model_inputs(batch)
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and int(batch["input_ids"].max()) >= vocab:
        raise SecateursError(f"the text has token ids up to {int(batch['input_ids'].max())}, but the model's "
                             f"vocabulary has {vocab}: use the model's own tokenizer")
    logits = _first_logits(model, inputs, options, "the model fails on the training tokens ({}): text data trains "
                           "language models called with input_ids=")
    if teacher is None:
        return
    t_logits = _first_logits(teacher, inputs, teacher_options, "the teacher fails on the training tokens ({}): "
                             "pass a teacher with the same tokenizer")
    if t_logits.shape[-1] != logits.shape[-1]:
        raise SecateursError(f"the teacher's vocabulary has {t_logits.shape[-1]} tokens but the model's has "
                             f"{logits.shape[-1]}: pass a teacher with the same tokenizer")


# -- FSDP -----------------------------------------------------------------------------------


def _fully_shard(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` sharded with FSDP2, holding rank 0's weights; ``model`` itself stays whole.

    The caller's model is kept as it is so that the trained full weights can be
    gathered back into it (FSDP2 has no way to undo sharding in place).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # parameters go to the meta device in the copy: no second full copy in memory, even for a moment
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in model.parameters()}
    sharded = copy.deepcopy(model, memo)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for _, block in repeated_blocks(sharded):
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    sharded.to_empty(device=device)
    with torch.no_grad():  # buffers (masks, rotary tables) are not sharded: every rank has them whole
        for name, buffer in model.named_buffers():
            sharded.get_buffer(name).copy_(buffer)
    # rank 0's weights, so that every rank starts alike as under DDP
    set_model_state_dict(sharded, model.state_dict() if dist.get_rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return sharded


def _reshard(sharded: nn.Module) -> None:
    """Back to sharded parameters after a forward without backward.

    The root stays unsharded after its forward (it expects the backward at
    once); an optimizer built then, or a state dict taken then, would see the
    temporary full parameters instead of the shards that training updates.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in sharded.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _gather_(model: nn.Module, sharded: nn.Module, rank: int) -> None:
    """The full weights of a sharded copy into rank 0's ``model`` (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.load_state_dict(full)


# -- evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def evaluate_dataset(model: nn.Module, data: Dataset | DataLoader | list[dict[str, Tensor]], *,
                     batch_size: int | None = None, device: torch.device | str | None = None,
                     max_batches: int | None = None) -> dict[str, float]:
    """Accuracy and mean cross-entropy over labelled data, or loss and perplexity over token batches (eval mode).

    Args:
        model: a classifier, or a language model for token batches.
        data: ``(inputs, label)`` pairs, or token batches (e.g. ``token_batches(..., split="test")``,
            or :class:`~secateurs.data.text.MaskedTokens` for a masked LM).
        batch_size: default 256 images; token batches keep their own size.
        device: default: where the model's parameters are.
        max_batches: evaluate at most this many batches (per process).

    Returns:
        ``accuracy``, ``loss`` and ``examples`` for labelled data; ``loss`` (per
        predicted token), ``perplexity`` (its exp) and ``tokens`` (predicted) for text.

    Under an initialised process group each rank scores its own share and the
    sums are all-reduced, so every rank returns the exact metrics of the whole set.
    """
    dataset, options = _as_dataset(data, "the evaluation data")
    if _kind(dataset) == "text":
        _check_objective(model, dataset[0])  # a masked LM scored on next tokens would be a meaningless number
    return _evaluate(model, dataset, options, batch_size=batch_size, device=device, max_batches=max_batches)


def _evaluate(model: nn.Module, dataset: Dataset, options: dict[str, Any], *, batch_size: int | None = None,
              device: torch.device | str | None = None, max_batches: int | None = None,
              lockstep: bool = False) -> dict[str, float]:
    world = _World(dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else _World()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    text = _kind(dataset) == "text"
    size = _batch_size(dataset, options, batch_size, _DEFAULT_BATCH["text"] if text else 256)
    shard = Subset(dataset, range(world.rank, len(dataset), world.size)) if world.active else dataset
    loader = DataLoader(shard, batch_size=size, collate_fn=options.get("collate_fn"))
    count = len(loader) if max_batches is None else min(len(loader), max_batches)
    rounds = count
    if lockstep and world.active:
        # FSDP: each forward gathers weights from every rank, so every rank runs as many forwards
        most = torch.tensor([count], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        rounds = int(most)
    options_ = _call_options(model) if text else {}
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct (images), loss sum, count
    batches = iter(loader)
    with eval_mode(model):
        for i in range(rounds):
            if i >= count:  # only the forward counts here, not the result
                filler = next(iter(DataLoader(dataset, batch_size=1, collate_fn=options.get("collate_fn"))))
                filler = _to(filler, device)
                model(**_model_inputs(filler), **options_) if text else call_model(model, split_batch(filler)[0])
                continue
            batch = _to(next(batches), device)
            if text:
                loss, n = lm_loss_sum(_token_logits(model(**_model_inputs(batch), **options_)), batch)
                totals += torch.stack([torch.zeros((), dtype=torch.float64, device=device), loss.double(),
                                       n.double()])
                continue
            x, y = split_batch(batch)
            if y is None:
                raise SecateursError("evaluation needs labels: batches must be (inputs, labels)")
            logits = _logits(call_model(model, x)).float()
            totals += torch.stack([(logits.argmax(1) == y).sum().double(),
                                   F.cross_entropy(logits, y, reduction="sum").double(),
                                   torch.tensor(len(y), dtype=torch.float64, device=device)])
    if world.active:
        dist.all_reduce(totals)
    correct, loss, count_ = totals.tolist()
    if not count_:
        raise SecateursError("the evaluation data has no batches" if not text else
                             "the evaluation text has no tokens to predict: use a longer text")
    if text:
        mean = loss / count_
        return {"loss": mean, "perplexity": math.exp(mean) if mean < 700 else math.inf, "tokens": int(count_)}
    return {"accuracy": correct / count_, "loss": loss / count_, "examples": int(count_)}


# -- training -----------------------------------------------------------------------------


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    # Sorted by plain name so the order does not change when masks are added or
    # re-applied on resume: optimizer state is matched by position.
    named = sorted(((plain_name(n), p) for n, p in model.named_parameters() if p.requires_grad), key=lambda t: t[0])
    decay = [p for _, p in named if p.dim() > 1]
    no_decay = [p for _, p in named if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.peak_lr, momentum=config.momentum, nesterov=config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.peak_lr)


def _kd_loss(student: Tensor, teacher: Tensor, temperature: float, keep: Tensor | None = None) -> Tensor:
    """Hinton et al.: KL between softened distributions, scaled by T^2 so gradients keep their size.

    The mean is over examples, or for (batch, tokens, vocabulary) logits over the
    tokens that ``keep`` (the attention mask) keeps.
    """
    if student.dim() > 2:
        if keep is not None:
            student, teacher = student[keep], teacher[keep]
        student, teacher = student.flatten(0, -2), teacher.flatten(0, -2)
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean",
                    log_target=True) * (t * t)


def _check_teacher(teacher: nn.Module, model: nn.Module, x: Any) -> None:
    with torch.no_grad(), eval_mode(model), eval_mode(teacher):
        try:
            t_out = _logits(call_model(teacher, x))
        except SecateursError:
            raise
        except Exception as exc:
            raise SecateursError(f"the teacher fails on the training inputs ({first_line(exc)}): "
                                 "pass a teacher for the same inputs") from None
        s_out = _logits(call_model(model, x))
    if t_out.shape[1] != s_out.shape[1]:
        raise SecateursError(f"the teacher outputs {t_out.shape[1]} classes but the model outputs {s_out.shape[1]}: "
                             "pass a teacher trained for the same task")


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        raise SecateursError(f"cannot write checkpoint '{path}' ({first_line(exc)}): choose a writable "
                             "checkpoint directory") from None
    finally:
        tmp.unlink(missing_ok=True)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SecateursError(f"checkpoint '{path}' cannot be read ({first_line(exc)}): "
                             "delete it to start over") from None


def _plan(config: FinetuneConfig, sampler: DistributedSampler, batch_size: int, world: _World,
          tokens_per_item: float | None) -> int:
    """Optimizer steps in all: what the LR schedule spans.

    The token budget is turned into steps by walking the epochs' batches (the
    last batch of an epoch may be short), so for sequences of one length the
    schedule ends exactly where training stops.
    """
    full, rest = divmod(len(sampler), batch_size)
    steps_per_epoch = full + (rest > 0)
    limits = []
    if config.epochs is not None or (config.max_steps is None and config.max_tokens is None):
        limits.append(steps_per_epoch * (config.epochs or _DEFAULT_EPOCHS))
    if config.max_steps is not None:
        limits.append(config.max_steps)
    if config.max_tokens is not None and tokens_per_item:
        per_step = [batch_size * world.size * tokens_per_item] * full + [rest * world.size * tokens_per_item] * (rest > 0)
        epochs, left = divmod(config.max_tokens, sum(per_step))
        steps, seen = int(epochs) * steps_per_epoch, 0.0
        for tokens in per_step if left > 0 else []:
            steps, seen = steps + 1, seen + tokens
            if seen >= left:
                break
        limits.append(max(1, steps))
    return min(limits)


def finetune(
    model: nn.Module,
    train: Dataset | DataLoader | list[dict[str, Tensor]],
    *,
    config: FinetuneConfig | None = None,
    val: Dataset | DataLoader | list[dict[str, Tensor]] | None = None,
    teacher: nn.Module | None = None,
    example_inputs: Any = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Train ``model`` in place on ``train``; evaluate on ``val`` after each epoch (and every ``eval_every`` steps).

    Args:
        model: a classifier returning ``(batch, classes)`` logits (or an output with ``.logits``),
            or a language model returning ``(batch, tokens, vocabulary)`` logits, called with
            ``input_ids=`` (e.g. a transformers ``...ForCausalLM`` or ``...ForMaskedLM``).
        train: map-style dataset of ``(inputs, label)`` or a DataLoader over one; or token
            batches (``token_batches(...)``) for a causal LM, masked (:class:`~secateurs.data.text.MaskedTokens`)
            for a masked LM.
        config: how to train (see :class:`FinetuneConfig`).
        val: held-out data of the same kind, for accuracy (images) or perplexity (text),
            e.g. ``token_batches(..., split="test")``.
        teacher: a model with the same output classes, or the same vocabulary, to distil from
            (``kd_weight > 0``).
        example_inputs: inputs for the group-lasso trace (default: the first training batch).
        on_epoch_end: called as ``fn(epoch, metrics)`` after each epoch (after its checkpoint).

    Returns:
        The per-epoch history, every evaluation and the final metrics. Masks on the model
        (unstructured, N:M, gradual) are in force throughout, so pruned weights stay zero.
        With ``fsdp``, a sharded copy is trained and its full weights are gathered into
        ``model`` on rank 0 at the end (and at every checkpoint); the other ranks' ``model``
        keeps its starting weights.

    Example:
        >>> import torch, secateurs
        >>> from torch.utils.data import TensorDataset
        >>> from secateurs.train import FinetuneConfig, finetune
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        >>> data = TensorDataset(torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,)))
        >>> result = finetune(model, data, val=data, config=FinetuneConfig(epochs=2, progress=False))
        >>> len(result.history), 0.0 <= result.final["accuracy"] <= 1.0
        (2, True)

        A language model on token batches, with a budget of optimizer steps:

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                                    num_hidden_layers=1, num_attention_heads=2))
        >>> text = [{"input_ids": torch.arange(64).remainder(32).view(4, 16)}] * 4
        >>> result = finetune(llm, text, val=text[:1], config=FinetuneConfig(max_steps=3, optimizer="adamw",
        ...                                                                  progress=False))
        >>> result.history[-1]["step"], result.final["perplexity"] > 1
        (3, True)
    """
    config = config or FinetuneConfig()
    if config.kd_weight > 0 and teacher is None:
        raise SecateursError("kd_weight > 0 distils from a teacher: pass teacher= (CLI: --teacher)")
    dataset, options = _as_dataset(train, "the training data")
    kind = _kind(dataset)
    if kind != "text" and config.max_tokens is not None:
        raise SecateursError("max_tokens counts text tokens, and this data is not text: set max_steps instead")
    held_out = None
    if val is not None:
        held_out = _as_dataset(val, "the validation data")
        if _kind(held_out[0]) != kind:
            raise SecateursError(f"the training data is {kind} but the validation data is not: pass held-out "
                                 "data of the same kind")
    world = _join_world(config.device)
    try:
        if config.fsdp and not world.active:
            raise SecateursError("fsdp shards the model across processes: launch with torchrun --nproc_per_node N "
                                 "(N of at least 2), or train without fsdp")
        result = _run(model, dataset, options, kind, config, held_out, teacher, example_inputs, on_epoch_end, world)
    except BaseException:
        if world.created:  # no barrier: the other ranks may be blocked in a collective; fail fast
            dist.destroy_process_group()
        raise
    if world.created:
        # Free the DDP reducer and any finished collective handles before the backend shuts down:
        # gloo threads left holding tensors at interpreter exit can abort the process.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    bake_on_save_pretrained(model)  # gradual pruning may have masked a transformers model
    return result


def _checkpointing_switches(model: nn.Module) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Turn a transformers model's gradient (activation) checkpointing on and off."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise SecateursError(f"gradient checkpointing needs a transformers model that supports it; "
                             f"{type(model).__name__} does not: train without it")
    # non-reentrant: works under DDP and FSDP, and with inputs that do not require gradients
    options = {"use_reentrant": False}
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5.x: the new name
        return (lambda: model.activation_checkpointing_enable(activation_checkpointing_kwargs=options),
                model.activation_checkpointing_disable)
    return (lambda: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options),
            model.gradient_checkpointing_disable)


def _run(model: nn.Module, dataset: Dataset, options: dict[str, Any], kind: str, config: FinetuneConfig,
         held_out: tuple[Dataset, dict[str, Any]] | None, teacher: nn.Module | None, example_inputs: Any,
         on_epoch_end: Any, world: _World) -> FinetuneResult:
    training = _Training(model, dataset, options, kind, config, held_out, teacher, example_inputs, on_epoch_end,
                         world)
    if not config.gradient_checkpointing:
        return training.run()
    enable, disable = _checkpointing_switches(model)
    enable()
    try:
        return training.run()
    finally:
        disable()  # the model leaves as it came


class _Training:
    """One run of :func:`finetune`, in parts: data and step plan, extras (regularizer, gradual pruning),
    checkpoint restore, the networks (DDP/FSDP, teacher), the optimizer, then epochs of steps.

    The parts run in the order they are listed in :meth:`run`; that order is part of the behaviour
    (the random state each draws from, and a resumed run reaching the same state).
    """

    def __init__(self, model: nn.Module, dataset: Dataset, options: dict[str, Any], kind: str,
                 config: FinetuneConfig, held_out: tuple[Dataset, dict[str, Any]] | None,
                 teacher: nn.Module | None, example_inputs: Any, on_epoch_end: Any, world: _World) -> None:
        self.model, self.dataset, self.options, self.config = model, dataset, options, config
        self.held_out, self.teacher, self.example_inputs = held_out, teacher, example_inputs
        self.on_epoch_end, self.world = on_epoch_end, world
        self.kind, self.text = kind, kind == "text"
        self.step, self.tokens_seen = 0, 0.0
        self.result = FinetuneResult(rank=world.rank, world_size=world.size)

    def run(self) -> FinetuneResult:
        config = self.config
        self.device = _device(config, self.world)
        torch.manual_seed(config.seed)
        if not config.fsdp:  # with FSDP the caller's model stays where it is; a sharded copy trains
            self.model.to(self.device)
            if self.teacher is not None:
                self.teacher.to(self.device)  # called under no_grad in eval mode; its own flags stay as set
        self._prepare_data()
        self._prepare_extras()
        state = self._read_checkpoint()
        self._prepare_nets()
        self._prepare_optimizer()
        start_epoch = self._restore(state) if state is not None else 0
        self.net = self.student
        if self.world.active and not config.fsdp:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.distil = self.teacher_net is not None and config.kd_weight > 0

        if self.text and self.held_out is not None and self.step == 0:
            self._evaluate_now(0)  # the perplexity before training, on the training device (sharded under FSDP)
        for epoch in range(start_epoch, self.epochs):
            if self._budget_spent():
                break
            metrics = self._epoch(epoch)
            self.result.history.append(metrics)
            # progress=False asks for a quiet run (the demo, benchmarks): the epoch line drops to DEBUG;
            # under torchrun only rank 0 tells (the metrics are all-reduced: every rank has the same)
            log.log(logging.DEBUG if config.progress is False or self.world.rank else logging.INFO, "epoch %d/%d: %s",
                    epoch + 1, self.epochs, "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))
            if self.ckpt_path is not None:
                self._save(epoch + 1)
            if self.world.active:
                dist.barrier()  # nobody races ahead of the checkpoint
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch + 1, metrics)
        if self.held_out is not None:
            self.result.final = dict(self._evaluate_now(self.epochs))
        if config.fsdp:
            _gather_(self.model, self.student, self.world.rank)
        if any(True for _ in masked_tensors(self.model)):
            self.result.final["masked_tensors"] = sum(1 for _ in masked_tensors(self.model))
        return self.result

    # ---- set-up ---------------------------------------------------------------------------------

    def _prepare_data(self) -> None:
        """The sampler and loader, the first batch (for checks and the trace), and the step plan."""
        dataset, options, config, world = self.dataset, self.options, self.config, self.world
        self.sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True,
                                          seed=config.seed)
        self.batch_size = _per_process(_batch_size(dataset, options, config.batch_size, _DEFAULT_BATCH[self.kind]),
                                       world, given=bool(options.get("batch_size") or config.batch_size))
        self.loader = _loader(dataset, options, self.batch_size, config, self.sampler)
        self.steps_per_epoch = len(self.loader)
        self.first = _to(next(iter(DataLoader(dataset, batch_size=min(2, len(dataset)),
                                              collate_fn=options.get("collate_fn")))), self.device)
        self.x0 = _model_inputs(self.first) if self.text else split_batch(self.first)[0]
        per_item = float(_token_count(self.first)) / len(self.first["input_ids"]) if self.text else None
        self.total_steps = _plan(config, self.sampler, self.batch_size, world, per_item)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        if self.text:
            _check_objective(self.model, self.first)

    def _prepare_extras(self) -> None:
        """The sparsity regularizer and the gradual pruning schedule, where asked for."""
        config = self.config
        self.reg = None
        if config.regularize is not None:
            self.reg = make_regularizer(
                config.regularize, self.model, strength=config.reg_strength, growth=config.reg_growth,
                example_inputs=self.example_inputs if self.example_inputs is not None else self.x0)
        self.gradual = None
        if config.gradual_sparsity is not None:
            # the last step that runs is total_steps - 1: the schedule must end by then
            end = max(1, min(round(config.gradual_end * self.total_steps), self.total_steps - 1))
            self.gradual = GradualPruner(self.model, AGP(final=config.gradual_sparsity, start=0, end=end,
                                                         every=max(1, min(self.steps_per_epoch // 4, end))))

    def _read_checkpoint(self) -> dict[str, Any] | None:
        """A checkpoint to resume from (its weights and masks already loaded), or None."""
        config = self.config
        self.ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT if config.checkpoint_dir else None
        path = self.ckpt_path
        if not (config.resume and path is not None and path.is_file()):
            return None
        state = _load_checkpoint(path)
        if state.get("total_steps") != self.total_steps:
            raise SecateursError(f"checkpoint '{path}' was made for {state.get('total_steps')} steps, this run "
                                 f"has {self.total_steps}: resume with the same data, batch size, epochs, budget "
                                 "and processes")
        if bool(state.get("fsdp")) != config.fsdp:
            how = "with" if state.get("fsdp") else "without"
            raise SecateursError(f"checkpoint '{path}' was written {how} fsdp: resume it the same way ({how} --fsdp)")
        load_effective_state_(self.model, state["model"], state["masks"])
        return state

    def _prepare_nets(self) -> None:
        """The student (a sharded copy under FSDP) and teacher, checked on the first batch."""
        config = self.config
        self.student, self.teacher_net = self.model, self.teacher
        if config.fsdp:
            self.student = _fully_shard(self.model, self.device)
            self.teacher_net = _fully_shard(self.teacher, self.device) if self.teacher is not None else None
        self.call_opts, self.teacher_opts = {}, {}
        if self.text:
            self.call_opts = _call_options(self.model)
            self.teacher_opts = _call_options(self.teacher) if self.teacher is not None else {}
            _check_text(self.student, self.teacher_net, self.first, self.call_opts, self.teacher_opts)
        elif self.teacher is not None:
            _check_teacher(self.teacher_net, self.student, self.x0)
        if config.fsdp:
            _reshard(self.student)

    def _prepare_optimizer(self) -> None:
        config, device, total = self.config, self.device, self.total_steps
        self.optimizer = _optimizer(self.student, config)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        self.use_amp = config.amp if config.amp is not None else (device.type == "cuda"
                                                                   or config.amp_dtype is not None)
        self.amp_dtype = _AMP_DTYPES[config.amp_dtype] if config.amp_dtype else (
            torch.float16 if device.type == "cuda" else torch.bfloat16)
        # float16 overflows without loss scaling; under FSDP the DTensor gradients all-reduce the overflow check
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)

    def _restore(self, state: dict[str, Any]) -> int:
        """Optimizer, schedule, scaler, extras, random state and history from a checkpoint; the epoch to
        start from."""
        if self.config.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(self.student, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.reg is not None and state.get("regularizer"):
            self.reg.load_state_dict(state["regularizer"])
        if self.gradual is not None:
            self.gradual.current = float(state.get("gradual", 0.0))
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.result.history = list(state["history"])
        self.result.evals = list(state.get("evals", []))
        start_epoch = self.result.resumed_from = int(state["epoch"])
        self.step = int(state.get("step", start_epoch * self.steps_per_epoch))
        self.tokens_seen = float(state.get("tokens", 0.0))
        log.info("resuming from %s after epoch %d", self.ckpt_path, start_epoch)
        return start_epoch

    # ---- training -------------------------------------------------------------------------------

    def _budget_spent(self) -> bool:
        return self.step >= self.total_steps or (self.config.max_tokens is not None
                                                 and self.tokens_seen >= self.config.max_tokens)

    def _evaluate_now(self, epoch: int) -> dict[str, float]:
        """Held-out metrics after this step, evaluated once however often they are asked for."""
        result = self.result
        if result.evals and result.evals[-1]["step"] == self.step:
            return {k[4:]: v for k, v in result.evals[-1].items() if k.startswith("val_")}
        assert self.held_out is not None
        scores = _evaluate(self.student, *self.held_out, device=self.device, lockstep=self.config.fsdp)
        if self.config.fsdp:
            _reshard(self.student)
        result.evals.append({"epoch": epoch, "step": self.step, **({"tokens": self.tokens_seen} if self.text else {}),
                             **{f"val_{k}": v for k, v in scores.items()}})
        return scores

    def _losses(self, batch: Any) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """The loss of one batch, its task and distillation parts, the logits, and the count of predicted
        tokens (text) or the labels (images)."""
        config, teacher_net = self.config, self.teacher_net
        kd = None
        if self.text:
            logits = _token_logits(self.net(**_model_inputs(batch), **self.call_opts))
            lm_sum, count = lm_loss_sum(logits, batch)
            task = lm_sum / count.clamp_min(1)
            if self.distil:
                with torch.no_grad(), eval_mode(teacher_net):
                    t_logits = _token_logits(teacher_net(**_model_inputs(batch), **self.teacher_opts)).float()
                keep = batch["attention_mask"].bool() if "attention_mask" in batch else None
                kd = _kd_loss(logits.float(), t_logits, config.kd_temperature, keep)
            counted = count
        else:
            x, y = split_batch(batch)
            if y is None:
                raise SecateursError("training needs labels: batches must be (inputs, labels)")
            logits = _logits(call_model(self.net, x))
            task = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
            if self.distil:
                with torch.no_grad(), eval_mode(teacher_net):
                    t_logits = _logits(call_model(teacher_net, x)).float()
                kd = _kd_loss(logits.float(), t_logits, config.kd_temperature)
            counted = y
        loss = task if kd is None else (1 - config.kd_weight) * task + config.kd_weight * kd
        return loss, task, kd, logits, counted

    def _optimizer_step(self, loss: Tensor) -> None:
        total = loss + self.reg() if self.reg is not None else loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        self.step += 1

    @torch.no_grad()
    def _tally(self, sums: Tensor, batch: Any, loss: Tensor, task: Tensor, kd: Tensor | None, logits: Tensor,
               counted: Tensor, bar: Progress) -> None:
        """Add one step to the epoch's sums. Images: loss sum, correct, count; text: loss, LM loss and KD
        loss sums (per predicted token), count."""
        if self.text:
            tokens = _token_count(batch)
            if self.world.active:  # every rank must see the same count to stop at the same step
                dist.all_reduce(tokens)
            self.tokens_seen += float(tokens)
            n = counted.double()
            sums += torch.stack([loss.detach().double() * n, task.detach().double() * n,
                                 (kd.detach().double() if kd is not None else torch.zeros_like(n)) * n, n])
            bar.update(loss=float(loss.detach()))
        else:
            y = counted
            sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                 torch.tensor(len(y), dtype=torch.float64, device=self.device)])
            bar.update(loss=float(loss.detach()), acc=float(sums[1] / sums[2]))

    def _epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch of steps (up to the budget); its metrics."""
        config = self.config
        self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):  # e.g. MaskedTokens: fresh masks every epoch
            self.dataset.set_epoch(epoch)
        started = time.perf_counter()
        self.net.train()
        sums = torch.zeros(4 if self.text else 3, dtype=torch.float64, device=self.device)
        bar = Progress(min(self.steps_per_epoch, self.total_steps - self.step), f"epoch {epoch + 1}/{self.epochs}",
                       enabled=config.progress if self.world.rank == 0 else False)
        for batch in self.loader:
            if self._budget_spent():
                break
            if self.gradual is not None:
                self.gradual(self.step)
            batch = _to(batch, self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                loss, task, kd, logits, counted = self._losses(batch)
            self._optimizer_step(loss)
            self._tally(sums, batch, loss, task, kd, logits, counted, bar)
            if config.eval_every and self.held_out is not None and self.step % config.eval_every == 0:
                self._evaluate_now(epoch + 1)
        bar.close()
        if self.world.active:
            dist.all_reduce(sums)
            for b in self.student.buffers():  # BatchNorm statistics: every rank keeps rank 0's
                dist.broadcast(b, 0)
        if self.reg is not None:
            self.reg.step()
        return self._metrics(epoch, sums, started)

    def _metrics(self, epoch: int, sums: Tensor, started: float) -> dict[str, Any]:
        metrics: dict[str, Any] = {"epoch": epoch + 1, "step": self.step}
        if self.text:
            loss_sum, lm_sum, kd_sum, count = sums.tolist()
            metrics.update(tokens=self.tokens_seen, train_loss=loss_sum / max(count, 1))
            if self.distil:
                metrics.update(train_lm_loss=lm_sum / max(count, 1), train_kd_loss=kd_sum / max(count, 1))
        else:
            loss_sum, correct, count = sums.tolist()
            metrics.update(train_loss=loss_sum / count, train_accuracy=correct / count)
        metrics.update(lr=self.optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - started)
        if self.reg is not None:
            metrics["reg_strength"] = self.reg.strength
            metrics["reg_below_1e-2"] = self.reg.below(1e-2).below
        if self.gradual is not None:
            metrics["sparsity"] = self.gradual.current
        if self.held_out is not None:
            metrics.update({f"val_{k}": v for k, v in self._evaluate_now(epoch + 1).items()})
        return metrics

    def _save(self, epoch: int) -> None:
        assert self.ckpt_path is not None
        _checkpoint(self.ckpt_path, self.model, self.student, self.optimizer, self.config, self.world, {
            "epoch": epoch, "total_steps": self.total_steps, "step": self.step, "tokens": self.tokens_seen,
            "fsdp": self.config.fsdp, "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(), "regularizer": self.reg.state_dict() if self.reg is not None else {},
            "gradual": self.gradual.current if self.gradual is not None else 0.0,
            "rng": torch.get_rng_state(), "history": self.result.history, "evals": self.result.evals,
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        })


def _checkpoint(path: Path, model: nn.Module, student: nn.Module, optimizer: torch.optim.Optimizer,
                config: FinetuneConfig, world: _World, payload: dict[str, Any]) -> None:
    """Write the checkpoint from rank 0; under FSDP every rank first helps gather the full state."""
    if config.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        _gather_(model, student, world.rank)
        optim_state = get_optimizer_state_dict(student, optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        optim_state = optimizer.state_dict()
    if world.rank != 0:
        return
    state_now, masks = effective_state_dict(model)
    _save_checkpoint(path, payload | {
        "model": {k: v.detach().cpu() for k, v in state_now.items()},
        "masks": {k: v.cpu() for k, v in masks.items()},
        "optimizer": optim_state,
    })
