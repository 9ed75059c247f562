"""Data packs: a data folder read, resampled and compressed into one file that ``train`` accepts as its data.

A pack lets a model be trained where the original images are not, or where SimpleITK is not installed (a
GPU server): ``sdmorganseg pack DATA --out data.sdmpack.npz --spacing ... --intensity ...`` reads every case
once, and the trainer computes the ground-truth SDMs from the packed label maps. The file is a numpy
``.npz`` (loaded with ``allow_pickle=False``: reading it runs no code) holding per case its image, label map
and spacing, and a JSON record of the organ names, annotations (partial labels), split and settings.

Images are stored compactly, close to what the network sees:

* ``window`` intensity (CT): Hounsfield units clipped to the window, in 256 levels (uint8; 5.9 HU a step
  for a 1500 HU window, below CT's noise of 10-20 HU in soft tissue);
* ``percentile`` intensity (MR): the normalised image in 256 levels between its minimum and maximum (uint8;
  the step is under 0.03 of the normalised standard deviation: below the MR noise).

The arrays are LZMA-compressed in the zip container (``np.load`` reads it): 199 OpenKBP CTs at 3.9 mm took
60 MB as int16 with numpy's deflate, and less than half of that as written here.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..common.errors import SDMOrganSegError
from ..common.files import atomic_path

PACK_FORMAT = "sdmorganseg-pack-1"
PACK_SUFFIX = ".npz"


def is_pack(path: str | Path) -> bool:
    """Whether ``path`` names a pack file rather than a data folder."""
    path = Path(path)
    return path.suffix == PACK_SUFFIX and path.is_file()


def _encode(image: np.ndarray, intensity: Mapping[str, Any]) -> tuple[np.ndarray, list[float]]:
    from ..method.preprocessing import normalize_intensity

    if intensity.get("method") == "window":
        low, high = float(intensity["low"]), float(intensity["high"])
        normalised = np.clip(image, low, high)
    else:
        normalised = normalize_intensity(image, intensity)
        low, high = float(normalised.min()), float(normalised.max())
    step = (high - low) / 255 or 1.0
    return np.rint((normalised - low) / step).astype(np.uint8), [low, step]


def _decode(stored: np.ndarray, scale: Sequence[float], intensity: Mapping[str, Any]) -> np.ndarray:
    from ..method.preprocessing import normalize_intensity

    low, step = scale
    values = (stored.astype(np.float32) * np.float32(step) + np.float32(low)).astype(np.float32)
    return normalize_intensity(values, intensity) if intensity.get("method") == "window" else values


def write_pack(
    data_dir: str | Path, out: str | Path, intensity: Mapping[str, Any], spacing: Sequence[float] | None = None,
    split_file: str | None = None, progress: Any = None,
) -> dict[str, Any]:
    """Read every case of ``data_dir`` (as ``train`` does) and write them into the pack ``out``; returns its record."""
    from .dataset import check_case_headers, find_cases, read_annotations, read_case_arrays, read_label_names, read_split

    out = Path(out)
    if out.suffix != PACK_SUFFIX:
        raise SDMOrganSegError(f"a pack file name ends in {PACK_SUFFIX}: {out}")
    cases = find_cases(data_dir)
    check_case_headers(cases)
    names = read_label_names(data_dir)
    if names is None:
        raise SDMOrganSegError(f"{data_dir} has no labels.json naming the organs; add {{\"labels\": {{\"1\": \"organ\"}}}}")
    label_values = sorted(names)
    case_names = [c.name for c in cases]
    annotations = read_annotations(data_dir, [names[v] for v in label_values], case_names)
    arrays: dict[str, np.ndarray] = {}
    for index, case in enumerate(cases):
        image, labels, case_spacing = read_case_arrays(case, label_values, spacing)
        arrays[f"image_{index}"], scale = _encode(image, intensity)
        arrays[f"labels_{index}"] = labels
        arrays[f"spacing_{index}"] = np.asarray(case_spacing, np.float64)
        arrays[f"scale_{index}"] = np.asarray(scale, np.float64)
        if progress:
            progress(index + 1, len(cases), case.name)
    record = {
        "format": PACK_FORMAT,
        "source": str(data_dir),
        "cases": case_names,
        "labels": {str(v): names[v] for v in label_values},
        "annotations": {n: [o for o, known in zip([names[v] for v in label_values], flags) if known] for n, flags in annotations.items()}
        if annotations is not None else None,
        "split": read_split(split_file, case_names) if split_file else None,
        "intensity": dict(intensity),
        "spacing": [float(s) for s in spacing] if spacing else None,
    }
    arrays["record"] = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as temporary:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_LZMA) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return record


@dataclass
class Pack:
    """A pack's record and arrays (see :func:`read_pack`)."""

    path: Path
    record: dict[str, Any]
    arrays: dict[str, np.ndarray]  #: every array, read at opening (an npz archive is not safe to share between threads)

    @property
    def case_names(self) -> list[str]:
        return list(self.record["cases"])

    @property
    def label_names(self) -> dict[int, str]:
        return {int(v): n for v, n in self.record["labels"].items()}

    @property
    def annotations(self) -> dict[str, list[str]] | None:
        return self.record.get("annotations")

    @property
    def split(self) -> dict[str, list[str]] | None:
        return self.record.get("split")

    @property
    def spacing(self) -> list[float] | None:
        return self.record.get("spacing")

    def mismatches(self, intensity: Mapping[str, Any], spacing: Sequence[float] | None) -> list[str]:
        """Settings of a run that differ from those the pack was made with (it cannot serve that run)."""
        problems = []
        if dict(intensity) != self.record["intensity"]:
            problems.append(f"intensity {self.record['intensity']} in the pack, {dict(intensity)} asked")
        packed = self.record.get("spacing")
        if (list(spacing) if spacing else None) != packed and not (spacing and packed and np.allclose(spacing, packed)):
            problems.append(f"spacing {packed} in the pack, {list(spacing) if spacing else None} asked")
        return problems

    def prepared(self, names: Sequence[str], label_values: Sequence[int], sdm: Mapping[str, Any], sdm_dtype: Any = np.float32) -> list:
        """The named cases as :class:`~SDMOrganSegLib.formats.dataset.PreparedCase`, ground-truth SDMs computed here
        (several cases at once: the distance transforms release the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        from .dataset import PreparedCase
        from ..common.files import worker_threads
        from ..method.sdm import label_map_to_sdms

        index = {name: i for i, name in enumerate(self.record["cases"])}
        missing = [n for n in names if n not in index]
        if missing:
            raise SDMOrganSegError(f"the pack {self.path} has no case {missing[0]}; pack the data folder that holds it")

        def one(name: str) -> PreparedCase:
            i = index[name]
            spacing = tuple(float(v) for v in self.arrays[f"spacing_{i}"])
            labels = self.arrays[f"labels_{i}"]
            image = _decode(self.arrays[f"image_{i}"], self.arrays[f"scale_{i}"].tolist(), self.record["intensity"])
            sdms = label_map_to_sdms(labels, label_values, spacing, sdm.get("normalization", "paper"), float(sdm.get("scale_mm", 5.0)))
            return PreparedCase(name, image, labels, sdms.astype(sdm_dtype, copy=False), spacing)

        with ThreadPoolExecutor(worker_threads()) as pool:
            return list(pool.map(one, names))


def read_pack(path: str | Path) -> Pack:
    """Open a pack written by :func:`write_pack`; refuses anything else in one line."""
    path = Path(path)
    try:
        arrays = np.load(path, allow_pickle=False)
        record = json.loads(bytes(arrays["record"]).decode())
    except Exception as error:  # any unreadable or foreign file
        raise SDMOrganSegError(f"{path} is not a data pack of sdmorganseg ({type(error).__name__}); make one with 'sdmorganseg pack'") from None
    if record.get("format") != PACK_FORMAT:
        raise SDMOrganSegError(f"{path} is a pack of another format ({record.get('format')!r}); make it again with this version's 'sdmorganseg pack'")
    return Pack(path, record, {key: arrays[key] for key in arrays.files if key != "record"})


def read_split_record(split: Mapping[str, Any], names: Sequence[str], source: str) -> dict[str, list[str]]:
    """A pack's stored split, checked against its cases like a split file."""
    known = set(names)
    train, validation = list(split.get("train", [])), list(split.get("validation", []))
    unknown = [n for n in train + validation if n not in known]
    if not train or not validation or unknown:
        raise SDMOrganSegError(f"the split stored in {source} is not usable (unknown case {unknown[0]!r})" if unknown else f"the split stored in {source} lacks training or validation cases")
    return {"train": train, "validation": validation}
