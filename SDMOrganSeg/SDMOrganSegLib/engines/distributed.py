"""Several processes on one job with PyTorch's own engine: ``torch.distributed``, launched by ``torchrun``.

``torchrun`` (or any launcher that sets the same variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) starts one process per GPU, or several on CPUs.
Without those variables, or with ``WORLD_SIZE=1``, every helper here is a no-op and a run is exactly the
single-process run.

- :func:`process_group` joins the processes: gloo on CPU; on GPUs NCCL for tensors on the GPU and gloo for
  the small objects and barriers that coordinate the ranks, so those never need a GPU.
- :func:`all_or_none` wraps a stage that can fail with a user error (reading a checkpoint, loading the
  data): if it fails on any rank, every rank stops with that rank's one-line message instead of waiting for
  ever at the next collective. Failures elsewhere (a rank killed, out of memory in a step) are torchrun's
  to handle: when one worker exits, it stops the others; the process group's timeout
  (``$SDMORGANSEG_DIST_TIMEOUT`` minutes, default 60) ends a wait on a rank that hangs.
- :func:`record_failure` hands the failing rank's message to torchrun (``TORCHELASTIC_ERROR_FILE``), so
  that torchrun's closing report shows it as the root cause.

Torch-free at import (the batch script imports it before it knows PyTorch is installed).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from ..common.errors import SDMOrganSegError
from .runner import resolve_device

TIMEOUT_ENV = "SDMORGANSEG_DIST_TIMEOUT"
DEFAULT_TIMEOUT_MINUTES = 60.0


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the job: ``rank`` of ``world_size`` in all, ``local_rank`` of
    ``local_world_size`` on this machine (one GPU each)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that validates and writes the run's shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def shard(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` when there are several processes, else None."""
        return (self.rank, self.world_size) if self.distributed else None


SINGLE = Ranks()


def from_environment(environ: Mapping[str, str] | None = None) -> Ranks:
    """The ranks torchrun's variables describe; :data:`SINGLE` without them."""
    environ = os.environ if environ is None else environ
    if environ.get("WORLD_SIZE", "1").strip() == "1":
        return SINGLE
    values = {}
    for name, default in (("RANK", None), ("WORLD_SIZE", None), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        text = environ.get(name, default)
        try:
            values[name] = int(text) if text is not None else -1
        except ValueError:
            values[name] = -1
        if values[name] < 0:
            raise SDMOrganSegError(
                f"{name}={text!r} is not a rank torchrun sets; start the run with torchrun, or unset WORLD_SIZE for a single process"
            )
    ranks = Ranks(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"])
    if not (ranks.rank < ranks.world_size and ranks.local_rank < ranks.local_world_size <= ranks.world_size):
        raise SDMOrganSegError(f"inconsistent torchrun variables ({ranks}); start the run with torchrun")
    return ranks


def processes_on_this_machine(environ: Mapping[str, str] | None = None) -> int:
    """``LOCAL_WORLD_SIZE`` as torchrun sets it, else 1 (never an error: it only divides a default budget)."""
    text = (os.environ if environ is None else environ).get("LOCAL_WORLD_SIZE", "1")
    return int(text) if text.isdigit() and int(text) > 0 else 1


def timeout_minutes(environ: Mapping[str, str] | None = None) -> float:
    """How long a rank waits for the others at a collective before the run stops."""
    text = (os.environ if environ is None else environ).get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_MINUTES
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not 0 < minutes < float("inf"):
        raise SDMOrganSegError(f"{TIMEOUT_ENV}={text!r} must be a positive number of minutes, e.g. 60")
    return minutes


def backend_for(device_type: str) -> str:
    """gloo on CPU; on GPUs NCCL for GPU tensors and gloo for objects and barriers (CPU memory)."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def batch_slice(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Start and stop of ``rank``'s share of a global batch of ``count`` items: contiguous, sizes differing by
    at most one (``count / world_size`` each when it divides); a rank may get none of a short last batch."""
    return count * rank // world_size, count * (rank + 1) // world_size


def shard(sizes: Sequence[float], world_size: int) -> list[list[int]]:
    """Indices of items of the given sizes (e.g. bytes) dealt to ``world_size`` ranks so their totals are
    close: largest first, each to the rank with the least so far (on ties the one with fewer items, then the
    lowest rank). Deterministic, so every rank computes the same deal without talking to the others; each
    rank's indices ascending."""
    totals = [0.0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(sizes)), key=lambda i: (-float(sizes[i]), i)):
        rank = min(range(world_size), key=lambda r: (totals[r], len(shares[r]), r))
        shares[rank].append(index)
        totals[rank] += float(sizes[index])
    return [sorted(share) for share in shares]


@contextlib.contextmanager
def process_group(backend: str, environ: Mapping[str, str] | None = None) -> Iterator[Ranks]:
    """Join the job's process group for the duration of the block (nothing to join without torchrun).

    A group that the calling program initialised already is used as it is, and left open."""
    ranks = from_environment(environ)
    if not ranks.distributed:
        yield ranks
        return
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != ranks.world_size:
            raise SDMOrganSegError(f"the process group has {dist.get_world_size()} processes but WORLD_SIZE says {ranks.world_size}")
        yield ranks
        return
    try:
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes(environ)))
    except (ValueError, RuntimeError) as error:
        raise SDMOrganSegError(
            f"rank {ranks.rank} could not join the other processes ({_one_line(error)}); start the run with torchrun "
            "(multi-node: the same --rdzv-endpoint on every node)"
        ) from None
    try:
        yield ranks
    except BaseException:
        # No teardown after a failure: NCCL's can block on a peer that is gone. The process exits anyway.
        raise
    else:
        # Every rank done before any tears its connections down: a rank that destroys the group while a peer
        # still has gloo traffic in flight makes the peer abort ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def rank_device(device: str, ranks: Ranks) -> Any:
    """The torch device of this rank: ``--device`` resolved, and with several processes on GPUs the GPU
    ``LOCAL_RANK`` of this machine (one GPU per process)."""
    import torch

    resolved = resolve_device(device)
    if resolved.type != "cuda" or not ranks.distributed:
        return resolved
    count = torch.cuda.device_count()
    if ranks.local_rank >= count:
        raise SDMOrganSegError(
            f"rank {ranks.rank} is process {ranks.local_rank} of its machine, which has {count} GPU(s): "
            f"start at most {count} process(es) per machine (--nproc-per-node), one per GPU"
        )
    resolved = torch.device("cuda", ranks.local_rank)
    torch.cuda.set_device(resolved)
    return resolved


class PeerFailed(SDMOrganSegError):
    """Another rank failed in a stage this rank took part in; that rank prints the message, this one exits quietly."""

    reported = True


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, SDMOrganSegError):
        return text
    return f"internal error ({type(error).__name__}: {text[:300]})"


@contextlib.contextmanager
def all_or_none(ranks: Ranks) -> Iterator[None]:
    """Run the block on every rank; if it fails on any, it fails on all.

    Every rank reports whether its block failed (one object all-gather, on CPU), so none is left waiting
    at a later collective. The lowest failing rank prints its message once, as the command line prints
    errors (``sdmorganseg: error: ...``), and raises its own error again; the others raise
    :class:`PeerFailed` with that message. Both carry ``reported = True``: the entry points print nothing more."""
    if not ranks.distributed:
        yield
        return
    import torch.distributed as dist

    failure: Exception | None = None
    try:
        yield
    except Exception as error:  # noqa: BLE001 (handed to the other ranks, then raised again below)
        failure = error
    messages: list[str | None] = [None] * ranks.world_size
    dist.all_gather_object(messages, None if failure is None else _one_line(failure))
    failed = [rank for rank, message in enumerate(messages) if message is not None]
    if not failed:
        return
    if failed[0] == ranks.rank:
        print(f"sdmorganseg: error: {messages[failed[0]]}", file=sys.stderr, flush=True)
    # Printed before any rank exits: torchrun stops the others as soon as the first one is gone.
    dist.barrier()
    if failed[0] == ranks.rank and failure is not None:
        failure.reported = True  # type: ignore[attr-defined]
        raise failure
    raise PeerFailed(f"rank {failed[0]} of {ranks.world_size} failed: {messages[failed[0]]}")


def broadcast(ranks: Ranks, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (pickled through gloo; tensors included)."""
    if not ranks.distributed:
        return value
    import torch.distributed as dist

    holder = [value if ranks.main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def check_same(ranks: Ranks, value: Any, what: str, fix: str) -> None:
    """Refuse, on every rank, a ``value`` that differs from rank 0's (e.g. a split of the cases made from
    another data folder on another machine)."""
    reference = broadcast(ranks, value)
    with all_or_none(ranks):
        if value != reference:
            raise SDMOrganSegError(f"rank {ranks.rank} has other {what} than rank 0; {fix}")


def gather(ranks: Ranks, value: Any) -> list[Any] | None:
    """Every rank's ``value``, in rank order, on rank 0 (None on the others)."""
    if not ranks.distributed:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * ranks.world_size if ranks.main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here (on CPU); a no-op for one process."""
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def data_parallel(network: Any, ranks: Ranks, device: Any) -> Any:
    """``network`` wrapped in DistributedDataParallel (gradients averaged over the ranks in the backward
    pass); the network itself for one process."""
    if not ranks.distributed:
        return network
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)


def global_batch_mean(ranks: Ranks, loss: Any, values: Mapping[str, float], output: Any, total: int) -> tuple[Any, dict[str, float]]:
    """The loss to back-propagate on this rank, and ``values`` (the loss and its parts on this rank's
    ``len(output)`` of the ``total`` patches of a global batch) as means over the global batch.

    The loss is a mean over patches; DistributedDataParallel averages the ranks' gradients, so this rank's
    loss is weighted by ``local * world_size / total`` (1 when the batch divides evenly): the sum over
    ranks is then the gradient of the mean over the global batch, as one process computes it. A rank
    with no patch of a short last batch back-propagates an exact zero through the network (each rank
    must take part in the gradient all-reduce)."""
    import torch
    import torch.distributed as dist

    local = int(output.shape[0])
    numbers = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    numbers = numbers * (local / total) if local else torch.zeros_like(numbers)  # an empty batch's mean is NaN
    dist.all_reduce(numbers)
    reduced = dict(zip(values, numbers.tolist()))
    if not local:
        return output.sum() * 0.0, reduced
    factor = local * ranks.world_size / total
    return (loss if factor == 1 else loss * factor), reduced


def lost_contact(ranks: Ranks, error: BaseException) -> str | None:
    """The one-line message for a collective that failed because another rank is gone or hangs (gloo's
    transport errors and timeouts, PyTorch's ``DistError``); None for any other error (a bug: its traceback
    is wanted)."""
    if not ranks.distributed or not isinstance(error, RuntimeError):
        return None
    import torch.distributed as dist

    text = str(error)
    if not isinstance(error, dist.DistError) and "gloo" not in text.lower():
        return None
    cause = " ".join(text.split("]", 1)[-1].split()).split(". ")[0][:200]  # without gloo's source file and advice
    return (
        f"rank {ranks.rank} lost contact with the other processes ({cause}); another rank stopped or hangs: "
        "its message is above or in torchrun's report. Rerun the same command to resume"
    )


def record_failure(message: str, environ: Mapping[str, str] | None = None) -> None:
    """Leave ``message`` where torchrun reads a worker's error (``TORCHELASTIC_ERROR_FILE``), so its report
    names the cause instead of "To enable traceback see ..."; nothing outside torchrun."""
    path = (os.environ if environ is None else environ).get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    with contextlib.suppress(OSError):
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"message": message, "timestamp": int(time.time())}, handle)
