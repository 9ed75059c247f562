"""The optimised code paths (issue 5) give what the straightforward code gives.

Each test compares an optimised function with a plain reference written here: the SDM normalisation
with the normalisation of the signed map, the label map with ``np.argmin``, the tiled prediction with a
plain numpy blend and with a float64 run, the cropped iso-surfaces with flying edges on the
whole volume, and the .vtp writer settings with a read-back.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import vtk
from scipy import ndimage
from vtk.util import numpy_support

from SDMOrganSegLib.images import contours
from SDMOrganSegLib.engines import inference
from SDMOrganSegLib.method import sdm
from SDMOrganSegLib.common.errors import CancelledError
from SDMOrganSegLib.method.network import UNet3D, preset
from conftest import float32_tolerance


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) < 1


MASKS = {
    "ellipsoid": _ellipsoid((30, 40, 50), (14, 20, 22), (8, 12, 15)),
    "noise": np.random.default_rng(0).random((20, 24, 28)) < 0.3,
    "at the border": np.pad(np.ones((5, 6, 7), bool), ((0, 9), (4, 2), (0, 3))),
    "one voxel": np.pad(np.ones((1, 1, 1), bool), ((3, 4), (0, 6), (5, 0))),
    "one hole": ~np.pad(np.ones((1, 1, 1), bool), ((3, 4), (2, 6), (5, 1))),
}


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5), (0.3, 2.0, 1.1)])
def test_normalized_sdm_is_the_normalised_signed_map(name, spacing):
    mask = MASKS[name]
    signed = sdm.signed_distance_mm(mask, spacing)
    expected = signed.copy()
    inside = signed < 0
    np.divide(expected, -float(signed.min()), out=expected, where=inside)
    np.divide(expected, float(signed.max()), out=expected, where=~inside)
    result = sdm.normalized_sdm(mask, spacing)
    assert result.dtype == np.float32
    assert np.array_equal(result, expected)  # bit for bit


@pytest.mark.parametrize("name", sorted(MASKS))
def test_signed_distance_is_exact(name):
    mask, spacing = MASKS[name], (0.8, 0.9, 2.5)
    sampling = tuple(reversed(spacing))
    expected = ndimage.distance_transform_edt(~mask, sampling=sampling) - ndimage.distance_transform_edt(mask, sampling=sampling)
    assert np.abs(sdm.signed_distance_mm(mask, spacing) - expected).max() < 1e-4


def _argmin_label_map(sdms: np.ndarray, values) -> np.ndarray:
    dtype = np.uint8 if max(values) < 256 else np.uint16
    deepest = np.argmin(sdms, axis=0)
    labels = np.asarray(values, dtype=dtype)[deepest]
    labels[~(np.take_along_axis(sdms, deepest[None], axis=0)[0] < 0)] = 0
    return labels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("values", [[1, 2, 5], [3], [7, 1000, 2, 9]])
def test_label_map_matches_argmin_with_ties_zeros_and_nan(dtype, values):
    rng = np.random.default_rng(len(values))
    sdms = rng.uniform(-1, 1, (len(values), 37, 9, 11)).astype(dtype)
    flat = sdms.reshape(len(values), -1)
    flat[:, ::7] = np.round(flat[:, ::7], 1)  # ties between organs
    flat[:, ::17] = 0.0
    flat[-1, ::19] = -0.0
    flat[rng.integers(0, len(values)), ::13] = np.nan
    expected = _argmin_label_map(sdms, values)
    for given in (sdms, list(sdms)):
        result = sdm.sdms_to_label_map(given, values)
        assert result.dtype == expected.dtype and np.array_equal(result, expected)


def test_label_map_slabs(monkeypatch):
    monkeypatch.setattr(sdm, "_LABEL_CHUNK_VOXELS", 50)  # several slabs, and slabs thinner than a slice
    sdms = np.random.default_rng(1).uniform(-1, 1, (3, 13, 8, 9)).astype(np.float32)
    assert np.array_equal(sdm.sdms_to_label_map(sdms, [1, 2, 3]), _argmin_label_map(sdms, [1, 2, 3]))
    with pytest.raises(ValueError):
        sdm.sdms_to_label_map(sdms, [1, 2])


def _plain_blend(network, volume, window, overlap):
    """predict_array as a plain numpy blend, tile by tile."""
    regions = inference.tiles(volume.shape, window, overlap)
    output = np.zeros((network.config.out_channels,) + volume.shape, np.float32)
    weight_sum = np.zeros(volume.shape, np.float32)
    with torch.inference_mode(), inference._cpu_convolutions(network, torch.device("cpu")):
        for region in regions:
            prediction = network(torch.from_numpy(np.ascontiguousarray(volume[region]))[None, None])[0].numpy()
            weights = inference.gaussian_weights(prediction.shape[1:])
            output[(slice(None),) + region] += prediction * weights
            weight_sum[region] += weights
    return output / weight_sum


@pytest.mark.parametrize("window", [(16, 32, 16), (32, 32, 48)])
def test_tiled_prediction_matches_a_plain_blend_and_leaves_the_network_alone(window):
    torch.manual_seed(0)
    network = UNet3D(preset("cpu", 1, 3)).eval()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    volume = np.random.default_rng(0).standard_normal((35, 52, 61)).astype(np.float32)
    progress = []
    result = inference.predict_array(network, volume, torch.device("cpu"), window, 0.25, progress=lambda f, m: progress.append(f))
    expected = _plain_blend(network, volume, window, 0.25)
    assert result.shape == expected.shape and result.dtype == np.float32
    assert np.array_equal(result, expected)  # the same network calls and float32 operations
    assert progress[-1] == pytest.approx(1.0) and len(progress) == len(inference.tiles(volume.shape, window, 0.25))
    for name, value in network.state_dict().items():
        assert value.is_contiguous() and torch.equal(value, before[name])
    assert not any("forward" in vars(m) for m in network.modules())  # the oneDNN routing is undone


def test_prediction_keeps_float32_accuracy_on_flat_regions():
    """Air in CT: a tile of nearly constant input, where a one-pass variance in group norm (PyTorch's
    channels-last CPU kernel) loses most digits. The prediction must stay close to a float64 run."""
    torch.manual_seed(4)
    network = UNet3D(preset("cpu", 1, 2)).eval()
    rng = np.random.default_rng(4)
    volume = np.full((32, 64, 64), -1.0, np.float32)  # CT air after windowing: exactly -1
    volume[8:24, 20:44, 30:60] = rng.uniform(-0.2, 0.6, (16, 24, 30))
    result = inference.predict_array(network, volume, torch.device("cpu"), (32, 32, 32), 0.25)
    with torch.inference_mode():
        double = UNet3D(preset("cpu", 1, 2)).double().eval()
        double.load_state_dict(network.state_dict())
        regions = inference.tiles(volume.shape, (32, 32, 32), 0.25)
        output = np.zeros((2,) + volume.shape)
        weight_sum = np.zeros(volume.shape)
        for region in regions:
            prediction = double(torch.from_numpy(volume[region].astype(np.float64))[None, None])[0].numpy()
            weights = inference.gaussian_weights(prediction.shape[1:]).astype(np.float64)
            output[(slice(None),) + region] += prediction * weights
            weight_sum[region] += weights
    expected = output / weight_sum
    # Measured 3.8e-6 against a bound of 4.1e-4; the channels-last group norm was off by up to 0.1.
    assert np.abs(result - expected).max() < float32_tolerance(network, np.abs(expected).max())


def test_single_tile_prediction_matches_the_network():
    torch.manual_seed(1)
    network = UNet3D(preset("cpu", 1, 2)).eval()
    volume = np.random.default_rng(2).standard_normal((20, 30, 25)).astype(np.float32)
    with torch.inference_mode():
        expected = network(torch.from_numpy(volume)[None, None])[0].numpy()
    result = inference.predict_array(network, volume, torch.device("cpu"))
    # oneDNN's float32 sums in another order than PyTorch's generic kernel: rounding-level differences.
    assert result.flags.c_contiguous and np.abs(result - expected).max() < float32_tolerance(network, np.abs(expected).max())


def _convolution_kernels(run) -> list[str]:
    with torch.profiler.profile() as profile:
        run()
    return [event.name for event in profile.events() if "conv" in event.name]


def test_every_convolution_goes_to_onednn_on_the_cpu():
    """PyTorch's own choice sends the 1-channel first convolution and the deep levels of a batch-1 call to
    its slow im2col kernel; predict_array routes them all to oneDNN, with the 1x1x1 head as a matrix
    product, and leaves the network as it was."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch has no oneDNN")
    torch.manual_seed(5)
    network = UNet3D(preset("cpu", 1, 3)).eval()
    network.head.bias.data.uniform_(-0.5, 0.5)  # the head's bias must survive the matrix-product path
    volume = np.random.default_rng(5).standard_normal((32, 48, 40)).astype(np.float32)
    tile = torch.from_numpy(volume)[None, None]
    with torch.inference_mode():
        plain_kernels = _convolution_kernels(lambda: network(tile))
        expected = network(tile)[0].numpy()
    assert "aten::slow_conv3d_forward" in plain_kernels  # what PyTorch picks by itself
    routed = _convolution_kernels(lambda: inference.predict_array(network, volume, torch.device("cpu")))
    convolutions = sum(1 for m in network.modules() if isinstance(m, torch.nn.Conv3d))
    assert plain_kernels.count("aten::convolution") == convolutions
    assert "aten::slow_conv3d_forward" not in routed and routed.count("aten::mkldnn_convolution") == convolutions - 1
    result = inference.predict_array(network, volume, torch.device("cpu"))
    assert np.abs(result - expected).max() < float32_tolerance(network, np.abs(expected).max())
    assert not any("forward" in vars(m) for m in network.modules())
    inference.ONEDNN_ON_CPU = False
    try:
        assert np.array_equal(inference.predict_array(network, volume, torch.device("cpu")), expected)
    finally:
        inference.ONEDNN_ON_CPU = True


def test_onednn_routing_is_undone_when_a_run_is_cancelled():
    network = UNet3D(preset("cpu", 1, 2)).eval()
    volume = np.zeros((32, 32, 64), np.float32)
    calls = []

    def cancel_after_first_tile() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(CancelledError):
        inference.predict_array(network, volume, torch.device("cpu"), (32, 32, 32), 0.25, cancel=cancel_after_first_tile)
    assert len(calls) == 2 and not any("forward" in vars(m) for m in network.modules())


def _sdm_image(direction=None) -> sitk.Image:
    labels = np.zeros((40, 48, 44), np.uint8)
    labels[_ellipsoid(labels.shape, (20, 22, 20), (9, 12, 10))] = 1
    image = sitk.GetImageFromArray(sdm.normalized_sdm(labels == 1, (0.8, 0.9, 2.0)))
    image.SetSpacing((0.8, 0.9, 2.0))
    image.SetOrigin((-10.0, 20.0, 5.0))
    if direction is not None:
        image.SetDirection(direction)
    return image


def _whole_volume_surface(image: sitk.Image, level: float) -> np.ndarray:
    """Flying edges on the whole volume, points mapped to LPS with numpy: the reference."""
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image))
    grid = vtk.vtkImageData()
    grid.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    grid.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.reshape(-1), deep=True))
    surfaces = vtk.vtkFlyingEdges3D()
    surfaces.SetInputData(grid)
    surfaces.SetValue(0, level)
    surfaces.Update()
    output = surfaces.GetOutput()
    if output.GetNumberOfPoints() == 0:
        return np.zeros((0, 3))
    index = numpy_support.vtk_to_numpy(output.GetPoints().GetData()).astype(np.float64)
    matrix = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    return index @ matrix.T + np.asarray(image.GetOrigin())


@pytest.mark.parametrize("oblique", [False, True])
def test_iso_surfaces_match_the_whole_volume(oblique):
    direction = sitk.VersorTransform((0.2, 0.3, 0.1), 0.4).GetMatrix() if oblique else None
    image = _sdm_image(direction)
    levels = (0.0, 0.1, 0.3, -0.2, 0.95, 1.5)
    surfaces = contours.iso_surfaces(image, levels)
    assert list(surfaces) == [float(level) for level in levels]
    for level in levels:
        expected = _whole_volume_surface(image, level)
        polydata = surfaces[float(level)]
        assert polydata.GetNumberOfPoints() == len(expected)
        if len(expected):
            points = numpy_support.vtk_to_numpy(polydata.GetPoints().GetData())
            # Same points in the same order; flying edges interpolates in float32 index coordinates, which
            # round differently in a cropped box (about 1e-7 of the index).
            assert np.abs(points - expected).max() < 1e-4
        single = contours.iso_surface(image, level)
        assert single.GetNumberOfPoints() == polydata.GetNumberOfPoints()


def test_iso_surface_leaves_the_vtk_backend_as_it_was():
    backend = vtk.vtkSMPTools.GetBackend()
    contours.iso_surfaces(_sdm_image(), (0.0,))
    assert vtk.vtkSMPTools.GetBackend() == backend


def test_written_vtp_reads_back(tmp_path):
    polydata = contours.iso_surface(_sdm_image(), 0.0)
    path = tmp_path / "surface.vtp"
    contours.write_polydata(polydata, str(path))
    reader = vtk.vtkXMLPolyDataReader()
    reader.SetFileName(str(path))
    reader.Update()
    back = reader.GetOutput()
    assert back.GetNumberOfPoints() == polydata.GetNumberOfPoints() and back.GetNumberOfPolys() == polydata.GetNumberOfPolys()
    assert np.array_equal(numpy_support.vtk_to_numpy(back.GetPoints().GetData()), numpy_support.vtk_to_numpy(polydata.GetPoints().GetData()))
    assert back.GetFieldData().GetAbstractArray("SPACE").GetValue(0) == "LPS"


def test_lps_to_ras_negates_x_and_y_and_leaves_the_input_alone():
    lps = contours.iso_surface(_sdm_image(), 0.0)
    before = numpy_support.vtk_to_numpy(lps.GetPoints().GetData()).copy()
    ras = contours.lps_to_ras(lps)
    after = numpy_support.vtk_to_numpy(ras.GetPoints().GetData())
    assert after.dtype == before.dtype and np.array_equal(after, before * np.array([-1, -1, 1], before.dtype))
    assert np.array_equal(numpy_support.vtk_to_numpy(lps.GetPoints().GetData()), before), "the LPS surface was changed"
    assert ras.GetNumberOfPolys() == lps.GetNumberOfPolys() > 0
    assert np.array_equal(numpy_support.vtk_to_numpy(ras.GetPolys().GetConnectivityArray()), numpy_support.vtk_to_numpy(lps.GetPolys().GetConnectivityArray()))


def test_network_still_trains_after_prediction():
    """predict_array runs between training epochs: the layout round trip must leave trainable parameters."""
    torch.manual_seed(2)
    network = UNet3D(preset("cpu", 1, 2))
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    volume = np.random.default_rng(3).standard_normal((20, 40, 36)).astype(np.float32)
    for window in (None, (16, 32, 16)):
        network.eval()
        inference.predict_array(network, volume, torch.device("cpu"), window)
        network.train()
        assert not any(p.is_inference() for p in network.parameters())
        loss = network(torch.from_numpy(volume[:16, :32, :32])[None, None]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


class _LayoutNetwork(torch.nn.Module):
    """Deterministic 'network' computed in numpy, returned in channels-last layout like a CPU UNet's output."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"out_channels": 3, "depth": 0, "base_channels": 1})()
        self.scale = torch.nn.Parameter(torch.ones(1, 1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = np.concatenate([np.sin(x.numpy() * (k + 1)).astype(np.float32) for k in range(3)], axis=1)
        return torch.from_numpy(values).contiguous(memory_format=torch.channels_last_3d)


def test_blend_is_bit_identical_to_the_numpy_blend():
    volume = np.random.default_rng(0).standard_normal((30, 50, 41)).astype(np.float32)
    result = inference.predict_array(_LayoutNetwork(), volume, torch.device("cpu"), (16, 32, 16), 0.25)
    output = np.zeros((3,) + volume.shape, np.float32)
    weight_sum = np.zeros(volume.shape, np.float32)
    for region in inference.tiles(volume.shape, (16, 32, 16), 0.25):
        prediction = np.stack([np.sin(volume[region][None] * (k + 1)).astype(np.float32)[0] for k in range(3)])
        weights = inference.gaussian_weights(prediction.shape[1:])
        output[(slice(None),) + region] += prediction * weights
        weight_sum[region] += weights
    assert np.array_equal(result, output / weight_sum)


_MEMORY_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, SimpleITK as sitk, torch
from SDMOrganSegLib.engines import inference
from SDMOrganSegLib.formats.modelfiles import LoadedModel, ModelCard, organs_from_labels
from SDMOrganSegLib.method.network import UNet3D, preset

def status(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field))

torch.manual_seed(0)
network = UNet3D(preset("cpu", 1, 9)).eval()
card = ModelCard(name="m", architecture=network.config, organs=organs_from_labels({v: f"o{v}" for v in range(1, 10)}),
                 spacing=(1.0, 1.0, 2.0), window=(64, 64, 64))
model = LoadedModel(card=card, network=network, directory=None)
image = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, (96, 200, 200)).astype(np.int16))
image.SetSpacing((0.8, 0.8, 1.6))
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset VmHWM to the current RSS
inference.segment_image(image, model, "cpu", memory_gb=64)
size = image.GetSize()
model_shape = tuple(int(round(s * p / q)) for s, p, q in zip(size, image.GetSpacing(), card.spacing))[::-1]
estimate = inference.estimate_memory_bytes(size, model_shape, 9, network.config.base_channels, (64, 64, 64), 16)
print(json.dumps({"used": status("VmHWM:") - before, "estimate": estimate}))
"""


def test_memory_estimate_covers_what_segment_image_uses(tmp_path):
    """The budget check refuses or tiles runs from estimate_memory_bytes: it must not be below what a run
    really takes (peak RSS above the run's start: the first run in a fresh process, 9 organs, resampled in
    and out), and not far above it either, or machines with little RAM get refusals they don't need."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak memory")
    library = str(Path(inference.__file__).resolve().parents[1])
    completed = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, library], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    assert figures["used"] <= figures["estimate"] <= 3 * figures["used"], figures
