"""Model folders: weights in safetensors plus a JSON model card, checked before anything is run.

A model folder holds ``model.safetensors`` (tensors only: loading it cannot execute code, unlike a
pickled ``.pt``) and ``model.json``, the card: architecture, organs (names, label values, colours),
input spacing and intensity normalisation, training data, split, command and validation metrics, and the
sha256 of the weights. :func:`load_model` refuses a folder whose checksum, card or weights disagree.

A folder may also hold ``model.onnx``, the same network exported for ONNX Runtime (:mod:`.onnxmodel`),
listed in the card's ``onnx`` record with its sha256 and the sha256 of the weights it was exported from;
with it a model segments without PyTorch (``runtime`` of :func:`load_model`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .. import MODEL_CARD_FORMAT, __version__
from ..common.errors import SDMOrganSegError
from ..method.architecture import LABEL_SOURCES, UNetConfig
from ..common.files import atomic_path, check_writable, read_json_object, sha256_of, write_text_atomic
from ..method.preprocessing import DEFAULT_INTENSITY
from ..method.sdm import HEAVISIDE_K
from .terminology import check_terminology, default_terminology

if TYPE_CHECKING:  # PyTorch is imported only once a model is really built: refusing a bad folder is fast
    import torch

    from ..method.network import UNet3D

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
ONNX_FILE = "model.onnx"
#: Where the network can run: ``auto`` = ONNX Runtime when it is installed and the model has ``model.onnx``,
#: PyTorch otherwise.
RUNTIMES = ("auto", "onnxruntime", "torch")
#: What to install for each runtime (one line in errors).
INSTALL_TORCH = "pip install 'sdmorganseg[train]' (or, in Slicer, the PyTorch extension)"
INSTALL_ONNXRUNTIME = "pip install onnxruntime"
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".bin")

#: Colours (RGB 0-1) given to organs that a card lists without one; Slicer's GenericAnatomyColors-like.
DEFAULT_COLORS = [
    (0.85, 0.40, 0.30), (0.35, 0.60, 0.85), (0.95, 0.80, 0.25), (0.45, 0.75, 0.35), (0.70, 0.45, 0.80),
    (0.90, 0.55, 0.70), (0.40, 0.80, 0.80), (0.80, 0.60, 0.40), (0.60, 0.60, 0.60),
]


@dataclass(frozen=True)
class Organ:
    """One output channel: display name, value in label maps, colour (RGB in [0, 1]), and optionally its
    standard terminology (SNOMED CT codes, see :mod:`.terminology`) and the range of volumes (ml) the
    training labels had, which :mod:`.plausibility` checks predictions against."""

    name: str
    label: int
    color: tuple[float, float, float]
    terminology: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    volume_ml: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {"name": self.name, "label": self.label, "color": list(self.color)}
        if self.terminology:
            values["terminology"] = self.terminology
        if self.volume_ml:
            values["volume_ml"] = list(self.volume_ml)
        return values


@dataclass
class ModelCard:
    """Everything needed to use a model's weights, and the record of how they were made."""

    name: str
    architecture: UNetConfig
    organs: list[Organ]
    spacing: tuple[float, float, float] | None = None  #: (x, y, z) mm the model expects; None: as given
    intensity: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_INTENSITY))
    window: tuple[int, int, int] | None = None  #: sliding-window size (x, y, z) voxels; None: whole volume
    description: str = ""
    modality: str | None = None  #: "CT" or "MR": what the model was trained on (checked on input)
    field_of_view: str = ""  #: what the training images show, in words (e.g. "head and neck planning CT")
    input_extent_mm: tuple[float, float, float] | None = None  #: largest training image extent (x, y, z) mm
    heaviside_k: float = HEAVISIDE_K
    #: Inference defaults the model was measured with, e.g. ``{"tta": true}``; a caller's explicit choice wins.
    inference: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    #: ``model.onnx``'s record (:func:`SDMOrganSegLib.engines.onnxmodel.export_model`): file, sha256, the weights'
    #: sha256 it was exported from, output channels, axes; empty when the folder has no ONNX export.
    onnx: dict[str, Any] = field(default_factory=dict)
    software_version: str = __version__
    format: int = MODEL_CARD_FORMAT

    @property
    def labels_from(self) -> str:
        """Where a dual model's label map comes from: ``inference.labels_from``, one of ``LABEL_SOURCES``."""
        return self.inference.get("labels_from", "segmentation")

    def needed_format(self) -> int:
        """The oldest card format whose readers segment with this card as its metrics were measured."""
        if self.architecture.sdm_branch:
            return 3
        return 2 if self.labels_from == "sdm" else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.needed_format(),
            "name": self.name,
            "description": self.description,
            "software_version": self.software_version,
            "architecture": self.architecture.to_dict(),
            "organs": [organ.to_dict() for organ in self.organs],
            "spacing": list(self.spacing) if self.spacing else None,
            "intensity": self.intensity,
            "window": list(self.window) if self.window else None,
            "modality": self.modality,
            "field_of_view": self.field_of_view,
            "input_extent_mm": list(self.input_extent_mm) if self.input_extent_mm else None,
            "heaviside_k": self.heaviside_k,
            "inference": self.inference,
            "training": self.training,
            "metrics": self.metrics,
            "weights_sha256": self.weights_sha256,
            **({"onnx": self.onnx} if self.onnx else {}),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "model card") -> "ModelCard":
        try:
            card_format = int(values.get("format", 0))
            if card_format > MODEL_CARD_FORMAT:
                raise SDMOrganSegError(
                    f"{source} has format {card_format}, newer than this SDMOrganSeg ({__version__}) reads "
                    f"(format {MODEL_CARD_FORMAT}); update SDMOrganSeg"
                )
            organs = [
                Organ(
                    str(o["name"]), int(o["label"]), tuple(float(c) for c in o.get("color") or DEFAULT_COLORS[i % len(DEFAULT_COLORS)]),
                    check_terminology(o.get("terminology"), f"{source}, organ {o['name']!r}"),
                    tuple(float(v) for v in o["volume_ml"]) if o.get("volume_ml") else None,
                )
                for i, o in enumerate(values["organs"])
            ]
            modality = values.get("modality")
            if modality not in (None, "CT", "MR"):
                raise ValueError(f"modality must be 'CT', 'MR' or null, got {modality!r}")
            card = cls(
                name=str(values["name"]),
                architecture=UNetConfig.from_dict(values["architecture"]),
                organs=organs,
                spacing=tuple(float(s) for s in values["spacing"]) if values.get("spacing") else None,
                intensity=dict(values.get("intensity") or DEFAULT_INTENSITY),
                window=tuple(int(s) for s in values["window"]) if values.get("window") else None,
                description=str(values.get("description", "")),
                modality=modality,
                field_of_view=str(values.get("field_of_view") or ""),
                input_extent_mm=tuple(float(v) for v in values["input_extent_mm"]) if values.get("input_extent_mm") else None,
                heaviside_k=float(values.get("heaviside_k", HEAVISIDE_K)),
                inference=dict(values.get("inference") or {}),
                training=dict(values.get("training") or {}),
                metrics=dict(values.get("metrics") or {}),
                weights_sha256=str(values.get("weights_sha256", "")),
                onnx=dict(values.get("onnx") or {}),
                software_version=str(values.get("software_version", "")),
                format=card_format,
            )
        except SDMOrganSegError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise SDMOrganSegError(f"{source} is incomplete or malformed ({type(error).__name__}: {error}); re-export the model") from None
        card.validate(source)
        return card

    def validate(self, source: str = "model card") -> None:
        if len(self.organs) != self.architecture.out_channels:
            raise SDMOrganSegError(
                f"{source} lists {len(self.organs)} organs but its architecture has {self.architecture.out_channels} output channels; the card does not match the weights"
            )
        labels = [organ.label for organ in self.organs]
        if len(set(labels)) != len(labels) or min(labels, default=1) < 1:
            raise SDMOrganSegError(f"{source} has organ label values {labels}; they must be distinct positive integers")
        if len({organ.name for organ in self.organs}) != len(self.organs):
            raise SDMOrganSegError(f"{source} has duplicate organ names; each organ needs its own name")
        if self.spacing is not None and (len(self.spacing) != 3 or not all(0 < s < float("inf") for s in self.spacing)):
            raise SDMOrganSegError(f"{source} has spacing {self.spacing}; it must be three positive numbers (mm) or null")
        if self.window is not None and (len(self.window) != 3 or min(self.window) < 1):
            raise SDMOrganSegError(f"{source} has window {self.window}; it must be three positive voxel counts or null")
        if self.labels_from not in LABEL_SOURCES or (self.labels_from == "sdm" and self.architecture.heads != "dual"):
            raise SDMOrganSegError(
                f"{source} has inference.labels_from {self.labels_from!r}; it must be 'segmentation', or 'sdm' for a dual-head model"
            )

    @property
    def label_values(self) -> list[int]:
        return [organ.label for organ in self.organs]

    @property
    def organ_names(self) -> list[str]:
        return [organ.name for organ in self.organs]


class LoadedModel:
    """A checked model: its card, the folder it came from, and the runtime it segments with.

    ``runtime`` is ``"torch"`` or ``"onnxruntime"``; ``onnx`` the checked ``model.onnx`` (None without one);
    ``notes`` what the choice of runtime is worth telling the user. ``network`` (the PyTorch network, CPU,
    eval mode) is built from the checked weights when first used, so a model run on ONNX Runtime never
    imports PyTorch.
    """

    def __init__(
        self, card: ModelCard, network: UNet3D | None = None, directory: Path | None = None, *,
        onnx: Path | None = None, runtime: str = "torch", notes: Sequence[str] = (),
    ) -> None:
        self.card = card
        self._network = network
        self.directory = directory
        self.onnx = onnx
        self.runtime = runtime
        self.notes = list(notes)
        self.runners: dict[str, Any] = {}  #: :mod:`.inference`'s network runners of this model, by device

    @property
    def network(self) -> UNet3D:
        if self._network is None:
            self._network = _build_network(self.card, Path(self.directory))
        return self._network

    @network.setter
    def network(self, network: UNet3D) -> None:
        self._network = network

    @property
    def name(self) -> str:
        return self.card.name


def read_card(directory: Path) -> ModelCard:
    return ModelCard.from_dict(_card_values(directory), str(Path(directory) / CARD_FILE))


def _refuse_run_folder(directory: Path) -> None:
    """A training run folder (``sdmorganseg train --out RUN``) holds its models in ``best/`` and ``last/``
    beside a resume checkpoint: say which folder to use instead of refusing the checkpoint as a pickle."""
    best = Path(directory) / "best"
    if (best / CARD_FILE).is_file() and not (Path(directory) / CARD_FILE).is_file():
        raise SDMOrganSegError(
            f"{directory} is a training run folder, not a model folder; use {best} (the best validation model) "
            f"or {Path(directory) / 'last'} (the last epoch's)"
        )


def _card_values(directory: Path) -> dict[str, Any]:
    """The card's JSON object, unchecked."""
    card_path = Path(directory) / CARD_FILE
    _refuse_run_folder(directory)
    if not card_path.is_file():
        raise SDMOrganSegError(f"model folder {directory} has no {CARD_FILE} (the model card); it is not an SDMOrganSeg model")
    return read_json_object(card_path, f"model card {card_path}", "re-export the model")


def _refuse_non_safetensors(weights: Path) -> None:
    """Refuse, from its first bytes and without unpickling anything, a weights file that is not safetensors
    (8-byte little-endian header length, then a JSON header), such as a pickled ``.pt`` renamed."""
    with open(weights, "rb") as handle:
        start = handle.read(9)
    size = weights.stat().st_size
    if len(start) == 9 and start[8:9] == b"{" and 0 < int.from_bytes(start[:8], "little") <= size - 8:
        return
    if start[:1] == b"\x80" or start[:2] == b"PK":
        raise SDMOrganSegError(
            f"{weights} is a pickled PyTorch file, not safetensors; pickles can run code when loaded, so it is refused unread: "
            f"convert it to safetensors in a trusted environment"
        )
    raise SDMOrganSegError(f"{weights} is not a safetensors file (it is truncated or of another format); copy the model again")


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (PyTorch takes seconds to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a stand-in module without a spec (tests) counts as absent
        return False


def choose_runtime(runtime: str, card: ModelCard, directory: Path, has_onnx: bool) -> tuple[str, list[str]]:
    """``torch`` or ``onnxruntime`` for ``runtime`` (``auto``, ``onnxruntime`` or ``torch``), and notes; a
    runtime that cannot run this model here is refused in one line saying what to install or write."""
    if runtime not in RUNTIMES:
        raise SDMOrganSegError(f"unknown runtime {runtime!r}; use {', '.join(RUNTIMES)}")
    export_hint = f"sdmorganseg export {directory} writes it where PyTorch is installed"
    if runtime == "onnxruntime":
        if not has_onnx:
            raise SDMOrganSegError(f"model {card.name} has no {ONNX_FILE} for ONNX Runtime; {export_hint}, or use --runtime torch")
        if not installed("onnxruntime"):
            raise SDMOrganSegError(f"--runtime onnxruntime needs ONNX Runtime, which is not installed; {INSTALL_ONNXRUNTIME}, or use --runtime torch")
        return "onnxruntime", []
    if runtime == "torch":
        if not installed("torch"):
            raise SDMOrganSegError(f"--runtime torch needs PyTorch, which is not installed; {INSTALL_TORCH}, or use --runtime onnxruntime")
        return "torch", []
    if has_onnx and installed("onnxruntime"):
        return "onnxruntime", []
    if installed("torch"):
        why = "ONNX Runtime is not installed" if has_onnx else f"model {card.name} has no {ONNX_FILE} (sdmorganseg export {directory} writes it)"
        return "torch", [f"{why}: running on PyTorch"]
    if has_onnx:
        raise SDMOrganSegError(f"segmenting needs ONNX Runtime or PyTorch, and neither is installed; {INSTALL_ONNXRUNTIME}")
    raise SDMOrganSegError(f"model {card.name} has no {ONNX_FILE}, so segmenting with it needs PyTorch; {INSTALL_TORCH}, or {export_hint}")


def _checked_onnx(directory: Path, card: ModelCard, notes: list[str]) -> Path | None:
    """The folder's ``model.onnx`` when the card lists it and its checksum matches; refuses a listed file
    that is missing or altered; None (with a note) for one the card does not list or that was exported
    from other weights."""
    path = directory / ONNX_FILE
    record = card.onnx
    if not record:
        if path.is_file():
            notes.append(f"{path} is not listed in the model card, so it is not used; sdmorganseg export {directory} lists it")
        return None
    if record.get("file") != ONNX_FILE or not record.get("sha256"):
        raise SDMOrganSegError(f"the onnx record of the card in {directory} is malformed (it needs file {ONNX_FILE!r} and its sha256); rewrite it with sdmorganseg export {directory}")
    if not path.is_file():
        raise SDMOrganSegError(f"model folder {directory} has no {ONNX_FILE}, which its card lists; copy the model again or rewrite it with sdmorganseg export {directory}")
    digest = sha256_of(path)
    if digest != record["sha256"]:
        raise SDMOrganSegError(
            f"checksum mismatch for {path}: the card says {str(record['sha256'])[:12]}..., the file is {digest[:12]}...; "
            f"the ONNX model is corrupt or was replaced: copy the model again or rewrite it with sdmorganseg export {directory}"
        )
    if record.get("weights_sha256") != card.weights_sha256:
        notes.append(f"{path} was exported from other weights than {WEIGHTS_FILE}, so it is not used; sdmorganseg export {directory} rewrites it")
        return None
    return path


def load_model(directory: str | Path, runtime: str = "auto", *, check_onnx: bool = True) -> LoadedModel:
    """Load and check a model folder; any problem is an :class:`SDMOrganSegError` naming it and the fix.

    Checks, before anything is used: the card parses and is not newer than this code; the weights are
    safetensors (pickles are refused unread); their sha256 equals the card's; ``model.onnx``, when the card
    lists it, has the card's sha256. ``runtime`` (:data:`RUNTIMES`) chooses where the network runs
    (:func:`choose_runtime`); for PyTorch the network is built now, and every tensor must match the
    architecture the card describes; for ONNX Runtime, PyTorch is not imported. ``check_onnx=False`` ignores
    ``model.onnx`` (for :func:`SDMOrganSegLib.engines.onnxmodel.export_model`, which replaces it).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SDMOrganSegError(f"model folder {directory} does not exist; pass a folder holding {WEIGHTS_FILE} and {CARD_FILE}")
    weights = directory / WEIGHTS_FILE
    _refuse_run_folder(directory)
    if not weights.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles:
            raise SDMOrganSegError(
                f"model folder {directory} has pickled weights ({', '.join(pickles)}), which can run code when loaded and are refused; "
                f"convert them to {WEIGHTS_FILE} in a trusted environment"
            )
        raise SDMOrganSegError(f"model folder {directory} has no {WEIGHTS_FILE}; the weights are missing")
    _refuse_non_safetensors(weights)
    values = _card_values(directory)
    expected_digest = str(values.get("weights_sha256") or "")
    if not expected_digest:
        ModelCard.from_dict(values, str(directory / CARD_FILE))  # a newer or malformed card says so first
        raise SDMOrganSegError(f"model card in {directory} has no weights_sha256; the weights cannot be verified")
    digest = sha256_of(weights)
    if digest != expected_digest:
        raise SDMOrganSegError(
            f"checksum mismatch for {weights}: the card says {expected_digest[:12]}..., the file is {digest[:12]}...; "
            "the weights are corrupt or were replaced: download or copy the model again"
        )
    card = ModelCard.from_dict(values, str(directory / CARD_FILE))
    notes: list[str] = []
    onnx = _checked_onnx(directory, card, notes) if check_onnx else None
    chosen, runtime_notes = choose_runtime(runtime, card, directory, onnx is not None)
    model = LoadedModel(card, None, directory, onnx=onnx, runtime=chosen, notes=notes + runtime_notes)
    if chosen == "torch":
        model.network  # built and checked against the card now, before any work
    return model


def _build_network(card: ModelCard, directory: Path) -> UNet3D:
    """The PyTorch network of a checked model folder, its weights loaded (CPU, eval mode)."""
    if not installed("torch"):
        raise SDMOrganSegError(f"this needs PyTorch (the network of model {card.name} as PyTorch layers), which is not installed; {INSTALL_TORCH}")
    weights = directory / WEIGHTS_FILE
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..method.network import UNet3D

    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise SDMOrganSegError(f"{weights} is not a readable safetensors file ({error}); copy the model again") from None
    try:
        network = UNet3D(card.architecture)
    except (TypeError, ValueError, RuntimeError, OverflowError, ZeroDivisionError, MemoryError) as error:
        raise SDMOrganSegError(f"the architecture in the card of {directory} is invalid ({error}); re-export the model") from None
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{'...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        )
        raise SDMOrganSegError(f"the weights in {directory} do not fit the architecture in its card ({detail}); the card and weights are from different models")
    network.load_state_dict(state)
    network.eval()
    return network


def save_model(network: torch.nn.Module, card: ModelCard, directory: str | Path, overwrite: bool = False) -> ModelCard:
    """Write ``model.safetensors`` and ``model.json`` (with the weights' sha256) atomically.

    The card keeps its ``onnx`` record only for the same weights with their ``model.onnx`` in ``directory``;
    an export of the weights being replaced is removed with them (:func:`SDMOrganSegLib.engines.onnxmodel.export_model`
    writes a new one)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    for name in (WEIGHTS_FILE, CARD_FILE):
        check_writable(directory / name, overwrite)
    card.validate()
    state = {key: value.detach().cpu().contiguous() for key, value in network.state_dict().items()}
    with atomic_path(directory / WEIGHTS_FILE, overwrite) as temporary:
        save_file(state, str(temporary))
        card.weights_sha256 = sha256_of(temporary)
        exported = directory / ONNX_FILE
        if card.onnx:
            in_folder = exported.is_file() and sha256_of(exported) == card.onnx.get("sha256")
            if not in_folder or card.onnx.get("weights_sha256") != card.weights_sha256:
                if in_folder and overwrite:
                    exported.unlink()  # the export of the weights being replaced
                card.onnx = {}
        write_text_atomic(directory / CARD_FILE, json.dumps(card.to_dict(), indent=2) + "\n", overwrite)
    return card


def organ_key(name: str) -> str:
    """An organ or segment name for matching: lower case, letters and digits only ("Left_Parotid" and
    "left parotid" match)."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def organs_from_labels(names: dict[int, str], colors: Sequence[Sequence[float]] | None = None) -> list[Organ]:
    """Organs from a ``{label value: name}`` mapping, in label order, with default colours and, for organs
    whose names :mod:`.terminology` knows, their SNOMED CT codes."""
    colors = list(colors) if colors else DEFAULT_COLORS
    return [
        Organ(name, int(label), tuple(colors[i % len(colors)]), default_terminology(name))
        for i, (label, name) in enumerate(sorted(names.items()))
    ]


def models_root() -> Path:
    """Folder of the models shipped with SDMOrganSeg (``Resources/Models``).

    ``SDMORGANSEG_MODELS`` overrides it. In the source tree the folder is two levels above this package;
    in an installed Slicer extension, one level.
    """
    override = os.environ.get("SDMORGANSEG_MODELS")
    if override:
        return Path(override)
    library = Path(__file__).resolve().parents[1]  # SDMOrganSegLib/ (this file is in SDMOrganSegLib/formats/)
    for candidate in (library.parent.parent / "Resources" / "Models", library.parent / "Resources" / "Models"):
        if candidate.is_dir():
            return candidate
    return library.parent.parent / "Resources" / "Models"


def shipped_models() -> dict[str, Path]:
    """Name -> folder of every shipped model that has a card."""
    root = models_root()
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / CARD_FILE).is_file()}


DEFAULT_MODEL = "hippocampus"


def resolve_model(name_or_path: str | Path | None) -> Path:
    """A model folder from a shipped model's name, a path, or None for the default shipped model."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    shipped = shipped_models()
    path = Path(name_or_path)
    if str(name_or_path) in shipped:
        chosen = shipped[str(name_or_path)]
        # A model folder (or training run) of the same name in the current folder would be shadowed silently.
        if any((path / sub / CARD_FILE).is_file() for sub in (".", "best")) and path.resolve() != chosen.resolve():
            raise SDMOrganSegError(
                f"model {name_or_path!s} is both a shipped model and the folder {path.resolve()}; "
                f"pass ./{name_or_path!s} for the folder or {chosen} for the shipped model"
            )
        return chosen
    if path.exists():
        return path
    known = ", ".join(shipped) or "none installed"
    raise SDMOrganSegError(f"model {name_or_path!s} is neither a folder nor a shipped model (shipped: {known})")
