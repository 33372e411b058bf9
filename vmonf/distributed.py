"""Data parallelism on torch.distributed: every cross-process step of training lives here.

Under ``torchrun`` each process (rank) holds the whole data set and the same model.
Every global mini-batch is drawn from a generator seeded identically on all ranks
and split into contiguous shards, one per rank (:class:`ShardedBatches`, the
training loop's sampler, which is plain shuffled batching in one process). Each rank scales
its shard's mean loss by its share of the global batch, gradients are summed with
one all-reduce per step, and metrics are sums all-reduced before dividing; so a
distributed step computes the same update as one process on the global batch (up
to the order of floating-point sums). Only rank 0 writes files.

Backends: gloo on CPU, NCCL when the model is on CUDA. Sums of CPU tensors between
ranks of one machine bypass gloo's sockets through shared memory
(:mod:`vmonf._shared_memory`). Outside a process group every function here is the
identity, so single-process code pays nothing.
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vmonf._shared_memory import SharedMemoryReducer, open_reducer

__all__ = [
    "DEFAULT_TIMEOUT",
    "ShardedBatches",
    "all_reduce_gradients",
    "all_reduce_sum",
    "any_rank",
    "broadcast_int",
    "broadcast_module",
    "count_ranks",
    "gather_rows",
    "init_from_env",
    "is_main_process",
    "rank_and_size",
    "shard_range",
]

#: Seconds a collective waits for the other ranks before failing (VMONF_DIST_TIMEOUT).
DEFAULT_TIMEOUT = 300.0


def rank_and_size() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and outside a process group): the process that writes files."""
    return rank_and_size()[0] == 0


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment.

    Does nothing when already joined or when WORLD_SIZE is absent or 1. Uses NCCL
    for CUDA devices, gloo otherwise, and a timeout of VMONF_DIST_TIMEOUT seconds
    (default 300) so that a crashed rank makes the others fail instead of hang. A
    group joined here is destroyed at exit: left to the interpreter's teardown,
    gloo's threads now and then abort the process at exit ("terminate called without
    an active exception": seen once in this project's test runs). Returns whether this
    process is one of several.
    """
    if not dist.is_available():
        return False
    if not dist.is_initialized():
        if _env_number("WORLD_SIZE", 1) <= 1:
            return False
        missing = [
            name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ
        ]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for data-parallel training, but "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: launch "
                "with torchrun (which sets them all), or unset WORLD_SIZE"
            )
        _env_number("RANK", 0)
        timeout = _env_number("VMONF_DIST_TIMEOUT", DEFAULT_TIMEOUT, float)
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(int(_env_number("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
        atexit.register(_destroy_process_group)
    return dist.get_world_size() > 1


def _env_number(name: str, default: float, convert: type[int] | type[float] = int) -> float:
    """A numeric environment variable (``default`` when unset); ValueError naming it."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return convert(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name} must be {'an integer' if convert is int else 'a number'}"
            f", got {value!r}"
        ) from None


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_range(n: int, rank: int | None = None, size: int | None = None) -> tuple[int, int]:
    """[start, stop) of a rank's contiguous share of n items (sizes differ by <= 1);
    this process's share by default."""
    if rank is None or size is None:
        rank, size = rank_and_size()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class ShardedBatches:
    """Global mini-batches in a seeded order, each cut into one contiguous shard per rank.

    Yields this rank's indices; ``global_size`` is the size of the global batch the
    last shard came from. With one process it is plain shuffled batching.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.global_size = 0

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        rank, size = rank_and_size()
        order = torch.randperm(self.n, generator=self.generator)
        for batch in order.split(self.batch_size):
            self.global_size = batch.numel()
            yield batch.tensor_split(size)[rank] if size > 1 else batch


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum ``values`` over ranks, in place; returns it. CPU tensors of ranks on one
    machine go through shared memory (:mod:`vmonf._shared_memory`), others through
    the group's backend."""
    if rank_and_size()[1] > 1:
        reducer = _shared_memory_reducer(values)
        if reducer is None:
            dist.all_reduce(values)
        elif values.is_contiguous():
            reducer.all_reduce_(values)
        else:
            values.copy_(reducer.all_reduce_(values.contiguous()))
    return values


# The default group's shared-memory reducer (None: unavailable) and a weak reference
# to that group, so that this cache never keeps a destroyed group alive.
_reducer: tuple[weakref.ref[object], SharedMemoryReducer | None] | None = None


def _shared_memory_reducer(values: Tensor) -> SharedMemoryReducer | None:
    """The reducer for the CPU tensor ``values``, opened (collectively: every branch
    here is taken alike on all ranks) at the group's first call or when ``values``
    outgrow its slots; None for CUDA tensors or where shared memory is unavailable."""
    global _reducer
    if values.device.type != "cpu":
        return None
    group = dist.group.WORLD
    if (
        _reducer is None
        or _reducer[0]() is not group
        or (_reducer[1] is not None and not _reducer[1].fits(values))
    ):
        timeout = _env_number("VMONF_DIST_TIMEOUT", DEFAULT_TIMEOUT, float)
        enabled = os.environ.get("VMONF_SHARED_MEMORY", "1") != "0"  # agreed in the call
        reducer = open_reducer(values.numel() * values.element_size(), timeout, enabled=enabled)
        _reducer = (weakref.ref(group), reducer)
    return _reducer[1]


def count_ranks(flag: bool, device: torch.device) -> tuple[int, int]:
    """(how many ranks ``flag`` holds on, number of ranks): a collective call."""
    size = rank_and_size()[1]
    if size == 1:
        return int(flag), 1
    value = torch.tensor([float(flag)], device=device)
    return int(all_reduce_sum(value).item()), size


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (a collective decision, e.g. to stop)."""
    return count_ranks(flag, device)[0] > 0


def all_reduce_gradients(parameters: Sequence[nn.Parameter], loss: Tensor) -> Tensor:
    """Sum the gradients of ``parameters`` (missing = 0) and the scalar ``loss`` over
    ranks with one all-reduce; returns the summed loss (``loss`` in one process)."""
    if rank_and_size()[1] == 1:
        return loss.detach()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    # One buffer: in the parameters' dtype, float64 if they mix (cast back below).
    dtype = grads[0].dtype if len({g.dtype for g in grads}) == 1 else torch.float64
    flat = torch.cat(
        [*(g.reshape(-1).to(dtype) for g in grads), loss.detach().reshape(1).to(dtype)]
    )
    all_reduce_sum(flat)
    offset = 0
    for p, grad in zip(parameters, grads, strict=True):
        count = p.numel()
        summed = flat[offset : offset + count].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = summed.clone()
        else:  # in place: the gradient may be a view of a packed buffer (vmonf.packing)
            grad.copy_(summed)
        offset += count
    return flat[-1].to(loss.dtype)


def broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank (e.g. a seed drawn on each)."""
    if rank_and_size()[1] == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return int(holder[0])


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (one broadcast per device and
    dtype)."""
    if rank_and_size()[1] == 1:
        return
    tensors = list(module.state_dict().values())
    for kind in sorted({(t.device, t.dtype) for t in tensors}, key=str):
        group = [t for t in tensors if (t.device, t.dtype) == kind]
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=0)
        for tensor, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
            tensor.copy_(part.view_as(tensor))


def gather_rows(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn`` applied to this rank's rows of x (N, ...), results gathered in order (N, ...).

    Each rank evaluates only its shard (e.g. assignment scores of its points); all
    ranks end with the whole result.
    """
    size = rank_and_size()[1]
    if size == 1:
        return fn(x)
    start, stop = shard_range(x.shape[0])
    local = fn(x[start:stop])
    longest = -(-x.shape[0] // size)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    bounds = [shard_range(x.shape[0], r, size) for r in range(size)]
    return torch.cat([part[: b - a] for part, (a, b) in zip(parts, bounds, strict=True)])
