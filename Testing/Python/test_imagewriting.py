"""imagewriting.write_image: ITK's files, gzip-compressed by ISA-L, readable by any gzip/ITK reader."""

from __future__ import annotations

import gzip
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import SimpleITK as sitk

from SDMOrganSegLib.images import imagewriting
from SDMOrganSegLib.images.imagewriting import write_image

OBLIQUE = (0.0, 1.0, 0.0, 0.6, 0.0, 0.8, 0.8, 0.0, -0.6)


def _image(dtype, shape=(21, 30, 41), seed=0) -> tuple[sitk.Image, np.ndarray]:
    array = (np.random.default_rng(seed).standard_normal(shape) * 100).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((1.5, -2.0, 30.25))
    image.SetDirection(OBLIQUE)
    return image, array


def _nrrd_parts(data: bytes) -> tuple[bytes, bytes]:
    end = data.index(b"\n\n") + 2
    return data[:end], data[end:]


def test_isal_is_the_compressor():
    # The speed (benchmarks/bench_segment.py) depends on it; the zlib fallback is for Slicers without it.
    assert imagewriting._gzip.__name__ == "isal.igzip" and imagewriting.GZIP_LEVEL == 1


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int16])
def test_nifti_is_the_gzip_of_itks_own_file(tmp_path, dtype):
    image, array = _image(dtype)
    write_image(image, tmp_path / "ours.nii.gz")
    sitk.WriteImage(image, str(tmp_path / "itk.nii"), useCompression=False)
    assert gzip.decompress((tmp_path / "ours.nii.gz").read_bytes()) == (tmp_path / "itk.nii").read_bytes()
    back = sitk.ReadImage(str(tmp_path / "ours.nii.gz"))
    assert np.array_equal(sitk.GetArrayViewFromImage(back), array)
    assert back.GetPixelID() == image.GetPixelID()
    assert np.allclose(back.GetDirection(), OBLIQUE, atol=1e-6) and np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["itk.nii", "ours.nii.gz"]  # no probe or raw file left


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int16])
def test_nrrd_is_itks_header_with_gzip_encoding(tmp_path, dtype):
    image, array = _image(dtype)
    write_image(image, tmp_path / "ours.nrrd")
    sitk.WriteImage(image, str(tmp_path / "itk.nrrd"), useCompression=False)
    ours_header, ours_data = _nrrd_parts((tmp_path / "ours.nrrd").read_bytes())
    itk_header, itk_data = _nrrd_parts((tmp_path / "itk.nrrd").read_bytes())
    assert b"encoding: gzip\n" in ours_header and b"encoding: raw\n" in itk_header
    assert ours_header.replace(b"encoding: gzip", b"encoding: raw") == itk_header
    assert gzip.decompress(ours_data) == itk_data
    back = sitk.ReadImage(str(tmp_path / "ours.nrrd"))
    assert np.array_equal(sitk.GetArrayViewFromImage(back), array)
    assert np.allclose(back.GetSpacing(), image.GetSpacing()) and np.allclose(back.GetDirection(), OBLIQUE, atol=1e-9)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_images_beyond_the_fast_path_go_through_itks_raw_file(tmp_path, suffix):
    vector = sitk.Compose([sitk.GetImageFromArray(np.full((4, 5, 6), v, np.float32)) for v in (1.0, -2.0)])
    flat = sitk.GetImageFromArray(np.arange(30, dtype=np.int16).reshape(5, 6))
    for name, image in (("vector", vector), ("flat", flat)):
        assert not imagewriting._fast_path(image)
        write_image(image, tmp_path / f"{name}{suffix}")
        back = sitk.ReadImage(str(tmp_path / f"{name}{suffix}"))
        assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"flat{suffix}", f"vector{suffix}"]


def test_other_formats_and_uncompressed_are_itks(tmp_path):
    image, array = _image(np.float32)
    write_image(image, tmp_path / "a.mha")
    write_image(image, tmp_path / "b.nrrd", compress=False)
    assert np.array_equal(sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp_path / "a.mha"))), array)
    assert b"encoding: raw\n" in _nrrd_parts((tmp_path / "b.nrrd").read_bytes())[0]


def test_failure_leaves_nothing(tmp_path):
    image, _ = _image(np.float32)
    (tmp_path / "taken.nii.gz").mkdir()  # a folder where the file must go
    with pytest.raises((OSError, RuntimeError)):
        write_image(image, tmp_path / "taken.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["taken.nii.gz"] and not any((tmp_path / "taken.nii.gz").iterdir())
    with pytest.raises((OSError, RuntimeError)):
        write_image(image, tmp_path / "missing" / "x.nrrd")
    assert [p.name for p in tmp_path.iterdir()] == ["taken.nii.gz"]


def test_files_written_side_by_side_are_each_right(tmp_path):
    images = [_image(np.float32, (40, 50, 60), seed) for seed in range(6)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda item: write_image(item[1][0], tmp_path / f"{item[0]}.nii.gz"), enumerate(images)))
    for index, (_, array) in enumerate(images):
        assert np.array_equal(sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp_path / f"{index}.nii.gz"))), array)


def test_worker_threads_is_bounded():
    from SDMOrganSegLib.common.files import worker_threads

    assert 1 <= worker_threads() <= 4 and worker_threads(1) == 1


def test_without_isal_pythons_zlib_writes_the_same_content(tmp_path, monkeypatch):
    """Slicer installs that lack ``isal`` fall back to Python's gzip: other bytes, the same file content."""
    image, array = _image(np.float32)
    write_image(image, tmp_path / "isal.nii.gz")
    monkeypatch.setattr(imagewriting, "_gzip", gzip)
    monkeypatch.setattr(imagewriting, "GZIP_LEVEL", 1)
    for suffix in (".nii.gz", ".nrrd"):
        write_image(image, tmp_path / f"zlib{suffix}")
        assert np.array_equal(sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp_path / f"zlib{suffix}"))), array)
    assert gzip.decompress((tmp_path / "zlib.nii.gz").read_bytes()) == gzip.decompress((tmp_path / "isal.nii.gz").read_bytes())


def test_reading_check_without_isal_still_catches_corrupt_files(tmp_path, monkeypatch):
    from SDMOrganSegLib.images import imageio
    from SDMOrganSegLib.common.errors import SDMOrganSegError

    image, _ = _image(np.float32)
    write_image(image, tmp_path / "a.nii.gz")
    data = bytearray((tmp_path / "a.nii.gz").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    (tmp_path / "bad.nii.gz").write_bytes(bytes(data))
    for reader in (imageio._gzip, gzip):
        monkeypatch.setattr(imageio, "_gzip", reader)
        imageio.read_image(tmp_path / "a.nii.gz")
        with pytest.raises(SDMOrganSegError, match="truncated or corrupt gzip"):
            imageio.read_image(tmp_path / "bad.nii.gz")
