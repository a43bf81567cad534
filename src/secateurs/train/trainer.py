"""Recovery fine-tuning: knowledge distillation, cosine LR, AMP, checkpoints, resume, torchrun.

One function, :func:`finetune`, trains a (pruned) classifier on any map-style
dataset or DataLoader. The same call runs unchanged under
``torchrun --nproc_per_node N``: it then joins the process group (gloo on
CPU, nccl on GPU), wraps the model in PyTorch's DistributedDataParallel,
shards the data with a DistributedSampler, and only rank 0 writes
checkpoints. Nothing distributed is re-implemented here.

Runs are reproducible: the sampler is seeded by ``(seed, epoch)``, and a
checkpoint holds the model (with its masks), optimizer, LR schedule, AMP
scaler, regulariser strength, gradual-pruning state and RNG state, so a
resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import gc
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

from ..errors import SecateursError
from ..importance.stats import split_batch
from ..masks import effective_state_dict, load_effective_state_, masked_tensors, plain_name
from ..progress import Progress
from ..selection import call_model
from ..utils import eval_mode, first_line, launch_env, map_tensors
from .regularize import REGULARIZERS, make_regularizer
from .schedule import AGP, GradualPruner

__all__ = ["FinetuneConfig", "FinetuneResult", "evaluate_dataset", "finetune"]

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
_DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}


@dataclass(kw_only=True)
class FinetuneConfig:
    """How :func:`finetune` trains.

    Attributes:
        epochs: passes over the training data.
        lr: peak learning rate (default 0.05 for SGD, 1e-3 for AdamW); it
            follows a cosine from ``lr`` to zero over all steps.
        optimizer: ``sgd`` (momentum, Nesterov) or ``adamw``.
        momentum: SGD momentum.
        weight_decay: applied to weights only (not to biases or norm scales).
        batch_size: per process; a DataLoader passed in keeps its own.
        kd_weight: share of the loss from knowledge distillation, in [0, 1]
            (needs a teacher): ``(1 - w) * CE + w * T^2 * KL(teacher || student)``.
        kd_temperature: softmax temperature T of distillation.
        label_smoothing: of the cross-entropy.
        regularize: ``bn-l1`` (network slimming) or ``group-lasso``, or None.
        reg_strength: the regulariser's weight.
        reg_growth: added to the strength after every epoch (growing penalty).
        gradual_sparsity: final unstructured sparsity of gradual magnitude
            pruning (AGP cubic schedule) during training, or None.
        gradual_end: fraction of training by which ``gradual_sparsity`` is reached.
        amp: mixed precision (float16 with loss scaling on CUDA, bfloat16 on
            CPU); default: on for CUDA, off on CPU.
        device: ``cpu``, ``cuda``, ``cuda:1``...; default: CUDA when available
            (under torchrun, the local rank's GPU).
        seed: seeds the sampler order and the RNG (dropout, augmentation).
        checkpoint_dir: write ``last.pt`` there after every epoch (atomically).
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        progress: show a progress bar on stderr (rank 0 only); None: when the
            ``secateurs`` logger shows INFO (the CLI, unless ``--quiet``).
        num_workers: DataLoader worker processes.
    """

    epochs: int = 4
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    label_smoothing: float = 0.0
    regularize: str | None = None
    reg_strength: float = 1e-4
    reg_growth: float = 0.0
    gradual_sparsity: float | None = None
    gradual_end: float = 0.75
    amp: bool | None = None
    device: str | None = None
    seed: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise SecateursError(f"epochs must be at least 1, got {self.epochs}")
        if self.optimizer not in _DEFAULT_LR:
            raise SecateursError(f"unknown optimizer '{self.optimizer}': choose one of {', '.join(_DEFAULT_LR)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise SecateursError(f"lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise SecateursError(f"batch_size must be at least 1, got {self.batch_size}")
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
        if self.resume and self.checkpoint_dir is None:
            raise SecateursError("resume needs checkpoint_dir (CLI: --checkpoint-dir, or --out's checkpoints)")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else _DEFAULT_LR[self.optimizer]


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: one entry per epoch, and the final held-out metrics."""

    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
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


def _as_dataset(data: Dataset | DataLoader, what: str) -> tuple[Dataset, dict[str, Any]]:
    """The map-style dataset behind ``data`` and the DataLoader options to keep."""
    options: dict[str, Any] = {}
    if isinstance(data, DataLoader):
        options = {"batch_size": data.batch_size, "collate_fn": data.collate_fn, "num_workers": data.num_workers}
        data = data.dataset
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        raise SecateursError(f"{what} must be a map-style dataset (with __len__ and __getitem__) or a DataLoader "
                             "over one, so that it can be shuffled reproducibly and sharded across processes")
    if len(data) == 0:
        raise SecateursError(f"{what} is empty: check the data path")
    return data, options


def _loader(dataset: Dataset, options: dict[str, Any], config: FinetuneConfig, sampler: Any) -> DataLoader:
    return DataLoader(dataset, batch_size=options.get("batch_size") or config.batch_size, sampler=sampler,
                      collate_fn=options.get("collate_fn"), num_workers=options.get("num_workers", config.num_workers))


def _to(batch: Any, device: torch.device) -> Any:
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def _logits(out: Any) -> Tensor:
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise SecateursError("finetune trains classifiers: the model must return (batch, classes) logits")
    return logits


# -- evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def evaluate_dataset(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 256,
                     device: torch.device | str | None = None, max_batches: int | None = None) -> dict[str, float]:
    """Accuracy and mean cross-entropy over a labelled dataset (eval mode).

    Under an initialised process group each rank scores its own share and the
    sums are all-reduced, so every rank returns the exact metrics of the whole set.
    """
    dataset, options = _as_dataset(data, "the evaluation data")
    world = _World(dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else _World()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shard = Subset(dataset, range(world.rank, len(dataset), world.size)) if world.active else dataset
    loader = DataLoader(shard, batch_size=options.get("batch_size") or batch_size,
                        collate_fn=options.get("collate_fn"))
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    with eval_mode(model):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = split_batch(_to(batch, device))
            if y is None:
                raise SecateursError("evaluation needs labels: batches must be (inputs, labels)")
            logits = _logits(call_model(model, x)).float()
            totals += torch.stack([(logits.argmax(1) == y).sum().double(),
                                   F.cross_entropy(logits, y, reduction="sum").double(),
                                   torch.tensor(len(y), dtype=torch.float64, device=device)])
    if world.active:
        dist.all_reduce(totals)
    correct, loss, count = totals.tolist()
    if not count:
        raise SecateursError("the evaluation data has no batches")
    return {"accuracy": correct / count, "loss": loss / count, "examples": int(count)}


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


def _kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton et al.: KL between softened distributions, scaled by T^2 so gradients keep their size."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
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


def finetune(
    model: nn.Module,
    train: Dataset | DataLoader,
    *,
    config: FinetuneConfig | None = None,
    val: Dataset | DataLoader | None = None,
    teacher: nn.Module | None = None,
    example_inputs: Any = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Train ``model`` in place on labelled ``train`` data; evaluate on ``val`` after each epoch.

    Args:
        model: a classifier returning ``(batch, classes)`` logits (or an output with ``.logits``).
        train: map-style dataset of ``(inputs, label)`` or a DataLoader over one.
        config: how to train (see :class:`FinetuneConfig`).
        val: held-out data for per-epoch and final accuracy.
        teacher: a model with the same output classes to distil from (``kd_weight > 0``).
        example_inputs: inputs for the group-lasso trace (default: the first training batch).
        on_epoch_end: called as ``fn(epoch, metrics)`` after each epoch (after its checkpoint).

    Returns:
        The per-epoch history and final metrics. Masks on the model (unstructured,
        N:M, gradual) are in force throughout, so pruned weights stay zero.

    Example:
        >>> import torch, secateurs
        >>> from torch.utils.data import TensorDataset
        >>> from secateurs.train import FinetuneConfig, finetune
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        >>> data = TensorDataset(torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,)))
        >>> result = finetune(model, data, val=data, config=FinetuneConfig(epochs=2, progress=False))
        >>> len(result.history), 0.0 <= result.final["accuracy"] <= 1.0
        (2, True)
    """
    config = config or FinetuneConfig()
    if config.kd_weight > 0 and teacher is None:
        raise SecateursError("kd_weight > 0 distils from a teacher: pass teacher= (CLI: --teacher)")
    dataset, options = _as_dataset(train, "the training data")
    world = _join_world(config.device)
    try:
        result = _run(model, dataset, options, config, val, teacher, example_inputs, on_epoch_end, world)
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
    return result


def _run(model: nn.Module, dataset: Dataset, options: dict[str, Any], config: FinetuneConfig, val: Any,
         teacher: nn.Module | None, example_inputs: Any, on_epoch_end: Any, world: _World) -> FinetuneResult:
    device = _device(config, world)
    torch.manual_seed(config.seed)
    model.to(device)
    if teacher is not None:
        teacher.to(device)  # called under no_grad in eval mode; its own flags stay as the caller set them
    sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=config.seed)
    loader = _loader(dataset, options, config, sampler)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * config.epochs
    first = _to(next(iter(DataLoader(dataset, batch_size=min(2, len(dataset)),
                                     collate_fn=options.get("collate_fn")))), device)
    x0 = split_batch(first)[0]
    if teacher is not None:
        _check_teacher(teacher, model, x0)
    reg = None
    if config.regularize is not None:
        reg = make_regularizer(config.regularize, model, strength=config.reg_strength, growth=config.reg_growth,
                               example_inputs=example_inputs if example_inputs is not None else x0)
    gradual = None
    if config.gradual_sparsity is not None:
        # the last step that runs is total_steps - 1: the schedule must end by then
        end = max(1, min(round(config.gradual_end * total_steps), total_steps - 1))
        gradual = GradualPruner(model, AGP(final=config.gradual_sparsity, start=0, end=end,
                                           every=max(1, min(steps_per_epoch // 4, end))))

    ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT if config.checkpoint_dir else None
    state = _load_checkpoint(ckpt_path) if config.resume and ckpt_path is not None and ckpt_path.is_file() else None
    if state is not None:
        if state.get("total_steps") != total_steps:
            raise SecateursError(f"checkpoint '{ckpt_path}' was made for {state.get('total_steps')} steps, this run "
                                 f"has {total_steps}: resume with the same data, batch size, epochs and processes")
        load_effective_state_(model, state["model"], state["masks"])
    optimizer = _optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    use_amp = config.amp if config.amp is not None else device.type == "cuda"
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    result = FinetuneResult(rank=world.rank, world_size=world.size)
    start_epoch = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        if reg is not None and state.get("regularizer"):
            reg.load_state_dict(state["regularizer"])
        if gradual is not None:
            gradual.current = float(state.get("gradual", 0.0))
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        result.history = list(state["history"])
        start_epoch = result.resumed_from = int(state["epoch"])
        log.info("resuming from %s after epoch %d", ckpt_path, start_epoch)

    net = model
    if world.active:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        net.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}",
                       enabled=config.progress if world.rank == 0 else False)
        for i, batch in enumerate(loader):
            step = epoch * steps_per_epoch + i
            if gradual is not None:
                gradual(step)
            x, y = split_batch(_to(batch, device))
            if y is None:
                raise SecateursError("training needs labels: batches must be (inputs, labels)")
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = _logits(call_model(net, x))
                loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
                if teacher is not None and config.kd_weight > 0:
                    with torch.no_grad(), eval_mode(teacher):
                        t_logits = _logits(call_model(teacher, x)).float()
                    loss = (1 - config.kd_weight) * loss + config.kd_weight * _kd_loss(
                        logits.float(), t_logits, config.kd_temperature)
            total = loss + reg() if reg is not None else loss
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            with torch.no_grad():
                sums += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                                     torch.tensor(len(y), dtype=torch.float64, device=device)])
            bar.update(loss=float(loss.detach()), acc=float(sums[1] / sums[2]))
        bar.close()
        if world.active:
            dist.all_reduce(sums)
            for b in model.buffers():  # BatchNorm statistics: every rank keeps rank 0's
                dist.broadcast(b, 0)
        if reg is not None:
            reg.step()
        loss_sum, correct, count = sums.tolist()
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_accuracy": correct / count,
                                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started}
        if reg is not None:
            metrics["reg_strength"] = reg.strength
            metrics["reg_below_1e-2"] = reg.below(1e-2).below
        if gradual is not None:
            metrics["sparsity"] = gradual.current
        if val is not None:
            metrics.update({f"val_{k}": v for k, v in evaluate_dataset(model, val, device=device).items()})
        result.history.append(metrics)
        # progress=False asks for a quiet run (the demo, benchmarks): the epoch line drops to DEBUG
        log.log(logging.DEBUG if config.progress is False else logging.INFO, "epoch %d/%d: %s", epoch + 1, config.epochs,
                 "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))
        if ckpt_path is not None and world.rank == 0:
            state_now, masks = effective_state_dict(model)
            _save_checkpoint(ckpt_path, {
                "epoch": epoch + 1, "total_steps": total_steps,
                "model": {k: v.detach().cpu() for k, v in state_now.items()},
                "masks": {k: v.cpu() for k, v in masks.items()},
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(), "regularizer": reg.state_dict() if reg is not None else {},
                "gradual": gradual.current if gradual is not None else 0.0,
                "rng": torch.get_rng_state(), "history": result.history,
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            })
        if world.active:
            dist.barrier()  # nobody races ahead of the checkpoint
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics)
    if val is not None:
        result.final = evaluate_dataset(model, val, device=device)
    if any(True for _ in masked_tensors(model)):
        result.final["masked_tensors"] = sum(1 for _ in masked_tensors(model))
    return result
