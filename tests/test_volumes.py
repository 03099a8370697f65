"""Volumes in a canonical frame (data/volumes.py), their intensity (data/intensity.py), DICOM series
(data/dicom.py) and the preprocessing cache (data/volume_cache.py), on phantoms written here."""

import numpy as np
import pytest
import torch

from ddcnn.config import from_dict
from ddcnn.data.intensity import apply_intensity
from ddcnn.data.volume_folder import load_volume_folder, read_volume_file
from ddcnn.data.volumes import VolumeRecipe, crop_or_pad, read_raw, resample_shape
from ddcnn.decomposition import Decomposition
from ddcnn.errors import ConfigError, DataError
from volume_phantoms import SPACING, phantom, ras_affine, save_dicom_series, save_nifti, stored

nibabel = pytest.importorskip("nibabel")

RECIPE = VolumeRecipe((8, 12, 16), spacing=(4.0, 2.0, 2.0))


@pytest.mark.parametrize("how", ["flip_x", "zyx"])
def test_two_stored_orientations_give_identical_inputs_and_the_same_subdomain_sees_the_lesion(tmp_path, how):
    hu = phantom(lesion=True)
    a = save_nifti(tmp_path / "a.nii.gz", *stored(hu, ras_affine(), "as_is"))
    b = save_nifti(tmp_path / "b.nii.gz", *stored(hu, ras_affine(), how))
    assert not np.array_equal(np.asarray(nibabel.load(str(a)).dataobj), np.asarray(nibabel.load(str(b)).dataobj))
    x, y = read_volume_file(a, RECIPE), read_volume_file(b, RECIPE)
    assert torch.equal(x, y)
    # Only the lesion's HU lie in [200, 400]. Of the left and right halves of the width (the patient's left to
    # right), the second sees the lesion, in the right lung, whichever way the file was stored.
    lesion = VolumeRecipe(RECIPE.size, spacing=RECIPE.spacing, window=(200.0, 400.0))
    halves = Decomposition(RECIPE.size, (1, 1, 2))
    for path in (a, b):
        inside = halves.split(read_volume_file(path, lesion)[None]).flatten(2).sum(-1)[0]  # (2,)
        assert inside[1] > 1 and inside[0] == 0


def test_the_canonical_frame_is_ras_read_as_z_y_x():
    hu = phantom(lesion=False)
    raw = read_raw(save_nifti_tmp(hu, ras_affine()))
    np.testing.assert_array_equal(raw.array, hu.transpose(2, 1, 0).astype(np.float32))
    assert raw.spacing == (SPACING[2], SPACING[1], SPACING[0])


def save_nifti_tmp(hu, affine, offset=-1024.0):
    import tempfile
    from pathlib import Path

    return save_nifti(Path(tempfile.mkdtemp()) / "v.nii.gz", hu, affine, offset)


def test_nifti_scale_and_offset_are_honoured(tmp_path):
    hu = phantom(lesion=False)
    path = save_nifti(tmp_path / "v.nii", hu, ras_affine(), offset=-1024.0)
    image = nibabel.load(str(path))
    assert image.get_data_dtype() == np.uint16 and image.dataobj.inter == -1024
    np.testing.assert_array_equal(read_raw(path).array, hu.transpose(2, 1, 0))


def test_x_y_z_1_nifti_is_read_as_a_volume(tmp_path):
    hu = phantom(lesion=False)
    path = save_nifti(tmp_path / "v.nii.gz", hu[..., None], ras_affine(), offset=None)
    np.testing.assert_array_equal(read_raw(path).array, hu.transpose(2, 1, 0))


def test_hu_stored_with_an_offset_and_no_header_scaling_is_refused_naming_file_and_range(tmp_path):
    hu = phantom(lesion=False)
    path = save_nifti(tmp_path / "offset.nii.gz", (hu.astype(np.int32) + 1024).astype(np.uint16), ras_affine(),
                      offset=None)
    low, high = int(hu.min()) + 1024, int(hu.max()) + 1024
    with pytest.raises(DataError, match=rf"offset.nii.gz holds values in \[{low}, {high}\] with none below 0"):
        read_volume_file(path, RECIPE)


def test_a_volume_already_in_0_1_under_a_hu_window_is_refused_and_taken_as_stored_on_request(tmp_path):
    vol = np.random.default_rng(0).random((6, 6, 6)).astype(np.float32)
    np.save(tmp_path / "scaled.npy", vol)
    recipe = VolumeRecipe((6, 6, 6))
    with pytest.raises(DataError, match=r"scaled.npy holds values in \[0\.\d+, 0\.\d+\], already scaled.*stored"):
        read_volume_file(tmp_path / "scaled.npy", recipe)
    out = read_volume_file(tmp_path / "scaled.npy", VolumeRecipe((6, 6, 6), intensity="stored", window=None))
    assert torch.equal(out[0], torch.from_numpy(vol))


def test_percentile_and_zscore_modes():
    vol = np.random.default_rng(1).normal(300, 50, (5, 6, 7)).astype(np.float32)
    low, high = np.percentile(vol, [2, 98])
    got = apply_intensity(vol, "percentile", percentiles=(2, 98))
    np.testing.assert_allclose(got, np.clip((vol - low) / (high - low), 0, 1), atol=1e-6)
    z = apply_intensity(vol, "zscore")
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-5
    assert not apply_intensity(np.full((2, 2, 2), 3.0, np.float32), "zscore").any()


def test_config_window_may_be_null_with_another_intensity_mode(tiny_config):
    cfg = tiny_config(3, window=None, intensity="percentile")
    assert cfg.data.window is None
    with pytest.raises(ConfigError, match="data.window = null but data.intensity = window"):
        tiny_config(3, window=None)
    with pytest.raises(ConfigError, match="data.orientation"):
        tiny_config(3, orientation="RAR")
    with pytest.raises(ConfigError, match="data.intensity"):
        tiny_config(3, intensity="hu")


def test_resampling_to_a_spacing_keeps_the_physical_size():
    assert resample_shape((10, 16, 20), (3.0, 1.5, 1.5), (4.0, 2.0, 2.0)) == (8, 12, 15)
    vol = torch.arange(4 * 5 * 6, dtype=torch.float32).view(4, 5, 6)
    fitted = crop_or_pad(vol, (2, 7, 6))
    assert torch.equal(fitted[:, 1:6, :], vol[1:3])        # cut about the centre in D, padded in H
    assert (fitted[:, 0] == vol.min()).all() and (fitted[:, 6] == vol.min()).all()


@pytest.mark.parametrize("plane", ["axial", "coronal"])
def test_a_dicom_series_is_in_the_same_canonical_frame_as_the_nifti_of_the_same_scan(tmp_path, plane):
    pytest.importorskip("pydicom")
    hu = phantom(lesion=True)
    series = save_dicom_series(tmp_path / "series", hu, plane=plane)
    nifti = save_nifti(tmp_path / "v.nii.gz", *stored(hu, ras_affine(), "flip_x"))
    a, b = read_raw(series), read_raw(nifti)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.spacing, b.spacing)
    assert torch.equal(read_volume_file(series, RECIPE), read_volume_file(nifti, RECIPE))
    one = next(series.iterdir())
    with pytest.raises(DataError, match="is one DICOM file; a volume is a series"):
        read_volume_file(one.rename(one.with_suffix(".dcm")), RECIPE)


def test_patient_sub_folders_and_series_folders_in_a_volume_folder(tmp_path):
    pytest.importorskip("pydicom")
    save_dicom_series(tmp_path / "normal" / "patient-1" / "series-1", phantom(False, seed=1))
    save_nifti(tmp_path / "normal" / "patient-2" / "scan.nii.gz", phantom(False, seed=2), ras_affine())
    save_dicom_series(tmp_path / "ill" / "patient-3" / "s", phantom(True, seed=3))
    ds = load_volume_folder(tmp_path, size=(8, 12, 16), spacing=(4.0, 2.0, 2.0))
    assert ds.classes == ["ill", "normal"] and ds.labels.tolist() == [0, 1, 1] and ds.images.shape[0] == 3
    (tmp_path / "ill" / "stray.dcm").write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(DataError, match="holds DICOM files.*own folder"):
        load_volume_folder(tmp_path, size=(8, 12, 16))


def test_the_second_load_reads_the_cache_with_identical_tensors(tmp_path, capsys):
    root = tmp_path / "data"
    for c, lesion in (("a", False), ("b", True)):
        for i in range(2):
            save_nifti(root / c / f"v{i}.nii.gz", *stored(phantom(lesion, seed=i), ras_affine(), "flip_x"))
    args = dict(size=(8, 12, 16), spacing=(4.0, 2.0, 2.0), cache=tmp_path / "cache")
    first = load_volume_folder(root, **args)
    assert "0 of 4 read from the preprocessing cache" in capsys.readouterr().err
    second = load_volume_folder(root, **args)
    err = capsys.readouterr().err
    assert "4 of 4 read from the preprocessing cache" in err and "resampling skipped" in err
    assert "4 of 4 stored in another orientation (LAS: 4), turned to RAS" in err  # remembered by the cache
    assert torch.equal(first.images, second.images)
    uncached = load_volume_folder(root, size=(8, 12, 16), spacing=(4.0, 2.0, 2.0))
    assert torch.equal(first.images, uncached.images)
    load_volume_folder(root, **{**args, "spacing": (4.0, 3.0, 3.0)})  # another setting: another entry
    assert "0 of 4 read" in capsys.readouterr().err
    save_nifti(root / "a" / "v0.nii.gz", phantom(True, seed=9), ras_affine())  # a changed file: a miss
    load_volume_folder(root, **args)
    assert "3 of 4 read" in capsys.readouterr().err


def test_different_spacings_without_a_target_are_warned(tmp_path, capsys):
    for c, spacing in (("a", (1.5, 1.5, 3.0)), ("b", (1.0, 1.0, 2.0))):
        save_nifti(tmp_path / c / "v.nii.gz", phantom(c == "b"), ras_affine(spacing))
    load_volume_folder(tmp_path, size=(8, 8, 8))
    assert "2 different voxel spacings" in capsys.readouterr().err
    load_volume_folder(tmp_path, size=(8, 8, 8), spacing=(3.0, 1.5, 1.5))
    assert "voxel spacings" not in capsys.readouterr().err


def test_the_notes_say_what_preparing_a_volume_changed(tmp_path):
    hu, affine = stored(phantom(False), ras_affine(), "flip_x")
    notes: list[str] = []
    read_volume_file(save_nifti(tmp_path / "v.nii.gz", hu, affine), RECIPE, notes)
    assert notes == [f"{tmp_path / 'v.nii.gz'}: stored LAS, turned to RAS; 3x1.5x1.5 mm voxels resampled to 4x2x2 mm "
                     f"and fitted to 8x12x16"]
    notes.clear()
    read_volume_file(save_nifti(tmp_path / "w.nii.gz", phantom(False), ras_affine((2, 2, 4))), RECIPE, notes)
    assert notes == []


def test_a_npy_volume_has_no_spacing_to_resample_from(tmp_path):
    np.save(tmp_path / "v.npy", phantom(False).astype(np.float32))
    with pytest.raises(DataError, match="v.npy is a .npy array with no voxel spacing"):
        read_volume_file(tmp_path / "v.npy", RECIPE)


def test_config_records_the_recipe_round_trip():
    cfg = from_dict({"data": {"name": "volume-folder", "image_size": [8, 12, 16], "spacing": [4, 2, 2],
                              "orientation": "lps"}})
    recipe = VolumeRecipe.from_config(cfg.data)
    assert recipe.orientation == "LPS" and recipe.spacing == (4.0, 2.0, 2.0)
    assert VolumeRecipe.from_json(recipe.to_json()) == recipe


def test_a_contradicting_range_stops_the_run_with_one_line_naming_the_file_and_writes_nothing(tmp_path, capsys):
    import json

    from ddcnn.cli import main

    for c in ("a", "b"):
        for i in range(3):
            save_nifti(tmp_path / "data" / c / f"v{i}.nii.gz", phantom(c == "b", seed=i), ras_affine())
    np.save(tmp_path / "data" / "b" / "scaled.npy", np.random.default_rng(0).random((10, 16, 20)))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"data": {"name": "volume-folder", "root": str(tmp_path / "data"),
                                           "image_size": [8, 8, 8]}, "decomposition": {"grid": [1, 1, 2]}}))
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scaled.npy holds values in [0" in err[0] and "data.intensity: stored" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_set_too_large_for_memory_is_refused_before_any_volume_is_read(tmp_path, monkeypatch):
    from ddcnn.data import volume_folder

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "v.nii.gz").write_bytes(b"not read")  # refused before any file is opened
    monkeypatch.setattr(volume_folder, "free_memory", lambda device: 2 * 64 ** 3 * 4 - 1)
    with pytest.raises(ConfigError, match=r"the 2 volumes of .* at data.image_size = \[64, 64, 64\] take"):
        load_volume_folder(tmp_path, size=(64, 64, 64))
