"""The network as ONNX: the export of a model folder (needs PyTorch) and the network call on ONNX Runtime
(needs only ``onnxruntime`` and numpy), so that segmenting needs no PyTorch.

``model.onnx`` takes ``image``, float32 ``(batch, 1, z, y, x)``, and gives ``output``, float32
``(batch, channels, z, y, x)``: what the PyTorch network gives, one SDM (or logit) channel per output of the
card's architecture. The batch and the three spatial axes are dynamic; each spatial size must be a multiple
of ``2 ** depth`` (16 for the cpu preset, 64 for paper), so one file serves whole volumes of any size and
any sliding window. The PyTorch network pads other sizes inside its forward (edge-replicated) and crops
back; that branch depends on the input's size, so it stays out of the graph and :class:`OnnxNetwork` does
the same padding and cropping with numpy around it. The card's ``onnx`` record lists the file with its
sha256, the sha256 of the weights it was exported from and the output channels read from the graph.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..common.errors import SDMOrganSegError
from ..common.files import atomic_path, sha256_of, write_text_atomic
from .runner import NetworkRunner
from ..formats.modelfiles import CARD_FILE, INSTALL_ONNXRUNTIME, INSTALL_TORCH, ONNX_FILE, installed, load_model

INPUT_NAME = "image"
OUTPUT_NAME = "output"
#: ONNX operator set of the export: the dynamo exporter's default in torch 2.13; ONNX Runtime 1.19.2 (the
#: last with Python 3.9 wheels, for Slicer 5.6/5.8) runs opsets up to 21.
OPSET = 18
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's warnings (torchvision not installed, deprecations) and progress lines are not the user's business."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(network: Any, path: Path) -> dict[str, Any]:
    """Write ``network`` (a :class:`~SDMOrganSegLib.method.network.UNet3D`) to ``path`` as ONNX with torch's dynamo
    exporter; returns the card's record without the checksums (:func:`export_model` adds them)."""
    import torch

    multiple = int(network.size_multiple)
    # Traced on fake tensors, so the size costs nothing; not 1 block or batch 1 a side, which the exporter
    # would take as a fixed size.
    example = torch.zeros((2, network.config.in_channels) + (2 * multiple, 3 * multiple, 2 * multiple))
    # Spatial sizes are multiples of 2**depth by construction (the padding branch of forward is then
    # provably empty and leaves the graph); the batch is free.
    blocks = [torch.export.Dim(f"{axis}_blocks", min=1) for axis in "zyx"]
    shapes = {"x": {0: torch.export.Dim("batch", min=1), **{2 + i: multiple * block for i, block in enumerate(blocks)}}}
    network = network.eval()
    with _quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(
                network, (example,), dynamo=True, dynamic_shapes=shapes, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=OPSET, optimize=True, verbose=False,
            )
        except Exception as error:  # the exporter's many error types; its report is long
            first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise SDMOrganSegError(f"PyTorch could not export this network to ONNX ({first.strip()[:200]}); report this with the model folder") from None
        program.save(str(path))
    channels = int(program.model.graph.outputs[0].shape[1])  # from the graph: not assumed one per organ
    return {
        "file": ONNX_FILE,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "output_channels": channels,
        "size_multiple": multiple,
        "dynamic_axes": "batch, z, y, x (z, y, x multiples of size_multiple; segment pads to them)",
        "opset": OPSET,
        "exporter": f"torch {torch.__version__} (dynamo)",
    }


def export_model(directory: str | Path, check: bool = True) -> dict[str, Any]:
    """(Re)write ``directory/model.onnx`` from the folder's checked weights and list it in the card.

    With ``check`` (and ONNX Runtime installed) the export is run once on a random input and compared
    with PyTorch before it is kept. Returns the card's new ``onnx`` record. Replaces only ``model.onnx``
    and the card's ``onnx`` record, each written atomically.
    """
    import json

    directory = Path(directory)
    if not installed("torch"):
        raise SDMOrganSegError(f"exporting a model to ONNX needs PyTorch, which is not installed; {INSTALL_TORCH}")
    for module in ("onnx", "onnxscript"):
        if not installed(module):
            raise SDMOrganSegError(f"exporting a model to ONNX needs the {module} package, which is not installed; {INSTALL_TORCH}")
    model = load_model(directory, runtime="torch", check_onnx=False)  # the export it replaces may be altered
    card = model.card
    started = time.perf_counter()
    with atomic_path(directory / ONNX_FILE) as temporary:
        record = export_onnx(model.network, temporary)
        if check and installed("onnxruntime"):
            _check_export(model.network, temporary, record["size_multiple"])
        record["sha256"] = sha256_of(temporary)
        record["weights_sha256"] = card.weights_sha256
        card.onnx = record
        # The card last but inside the block: a failure leaves neither a new file nor a record of it.
        write_text_atomic(directory / CARD_FILE, json.dumps(card.to_dict(), indent=2) + "\n")
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _check_export(network: Any, path: Path, multiple: int) -> None:
    """Refuse an export whose output on a random input differs from PyTorch's by more than float32 rounding
    can explain (a mis-exported operator differs by 1e-2 and more)."""
    import torch

    shape = (1, network.config.in_channels) + tuple(multiple * k for k in (2, 3, 2))
    example = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with torch.inference_mode():
        expected = network(torch.from_numpy(example)).numpy()
    got = OnnxNetwork(path, "cpu")(example)
    difference = float(np.abs(got - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    if not difference <= 1e-3 * scale:
        raise SDMOrganSegError(f"the ONNX export differs from the PyTorch network by {difference:.3g}; it was not written (report this with the model folder)")


class OnnxNetwork(NetworkRunner):
    """The network call on ONNX Runtime: ``(n, 1, z, y, x)`` float32 in, ``(n, channels, z, y, x)`` out.

    ``device``: ``auto`` takes ONNX Runtime's CUDA provider when it has one (``onnxruntime-gpu``), else the
    CPU; ``cuda`` needs the CUDA provider; ``cpu`` the CPU.
    """

    runtime = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "auto", config: Any = None) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise SDMOrganSegError(f"ONNX Runtime is not installed; {INSTALL_ONNXRUNTIME}, or use --runtime torch") from None
        self.path = Path(path)
        self.config = config
        self.device = device
        available = onnxruntime.get_available_providers()
        wants_cuda = device not in (None, "", "auto", "cpu")
        if wants_cuda and CUDA not in available:
            raise SDMOrganSegError(
                f"--device {device} was asked for but this ONNX Runtime has no CUDA provider; install onnxruntime-gpu, "
                "or use --device cpu, or --runtime torch for PyTorch's CUDA"
            )
        providers = [CUDA, CPU] if CUDA in available and device != "cpu" else [CPU]
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings about provider choices are not the user's
        try:
            self.inference_session = onnxruntime.InferenceSession(str(self.path), options, providers=providers)
        except Exception as error:  # ONNX Runtime's own exception classes; the file was checked by sha256
            raise SDMOrganSegError(f"ONNX Runtime cannot load {self.path} ({' '.join(str(error).split())[:200]}); rewrite it with sdmorganseg export") from None
        self.provider = self.inference_session.get_providers()[0]
        self.output_channels = self.inference_session.get_outputs()[0].shape[1]
        self.size_multiple = int(2 ** getattr(config, "depth", 0)) if config is not None else 1

    @property
    def device_type(self) -> str:
        return "cuda" if self.provider == CUDA else "cpu"

    @property
    def description(self) -> str:
        return "cuda (ONNX Runtime)" if self.provider == CUDA else "cpu (ONNX Runtime)"

    def on_cpu(self) -> "OnnxNetwork":
        return OnnxNetwork(self.path, "cpu", self.config)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        spatial = batch.shape[2:]
        pad = [(-size) % self.size_multiple for size in spatial]
        if any(pad):  # as UNet3D.forward: edge-replicated up to the multiple, cropped back after
            batch = np.pad(batch, [(0, 0), (0, 0)] + [(0, p) for p in pad], mode="edge")
        try:
            output = self.inference_session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        except Exception as error:  # ONNX Runtime's exceptions derive from Exception only
            text = " ".join(str(error).split())
            if "allocat" in text.lower() or "out of memory" in text.lower():
                raise MemoryError(f"ONNX Runtime out of memory ({text[:200]})") from None
            raise
        if any(pad):
            output = output[(..., *(slice(0, size) for size in spatial))]
        return output
