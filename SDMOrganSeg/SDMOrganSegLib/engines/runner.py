"""What runs a network, below every engine that runs one: the PyTorch device a run uses (``--device``:
``auto``, ``cpu``, ``cuda``, ``cuda:N``, resolved against what this machine has; :func:`resolve_device`) and
the interface both runtimes implement (:class:`NetworkRunner`: PyTorch's ``inference.TorchNetwork``, ONNX
Runtime's ``onnxmodel.OnnxNetwork``).

Its own module so that the engines import each other one way only: :mod:`.distributed` needs the device and
:mod:`.inference` asks distributed how many processes share the machine; :mod:`.onnxmodel` implements the
runner and :mod:`.inference` builds an ONNX runner. Both pairs imported each other while these pieces lived
in inference. Importing this module does not import PyTorch.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ..common.errors import SDMOrganSegError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; asking for ``cuda`` without one is an error."""
    import torch

    if device in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") or device == "gpu":
        if not torch.cuda.is_available():
            raise SDMOrganSegError("--device cuda was asked for but no CUDA GPU is available to PyTorch; use --device cpu or auto")
        return torch.device("cuda" if device == "gpu" else device)
    if device == "cpu":
        return torch.device("cpu")
    raise SDMOrganSegError(f"unknown device {device!r}; use auto, cpu or cuda")


def device_description(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


class NetworkRunner:
    """The network as a call: a float32 array ``(n, 1, z, y, x)`` of tiles in, ``(n, channels, z, y, x)`` out.

    ``runtime``: ``torch`` or ``onnxruntime``; ``provider``: where it runs (PyTorch's device type, ONNX
    Runtime's execution provider); ``description``: the same for people; ``device_type``: ``cuda`` or
    ``cpu``; ``config``: the card's :class:`~SDMOrganSegLib.method.architecture.UNetConfig` (``depth`` gives the
    multiple the network pads to). :meth:`session` wraps a run of calls; :meth:`on_cpu` is the same
    network on the CPU (after a GPU ran out of memory).
    """

    runtime = ""
    provider = ""
    description = ""
    device_type = "cpu"
    config: Any = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        yield

    def release_memory(self) -> None:
        """Give back the GPU memory the network holds (after a run, or when a call ran out of memory)."""

    def on_cpu(self) -> "NetworkRunner":
        return self
