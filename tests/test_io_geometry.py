"""Outputs keep their input's geometry: NIfTI affines, GeoTIFF tags, zarr attributes."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr

from haloseg.errors import ConfigError
from haloseg.inference.io import Geometry, create_output, open_image, read_geometry

AFFINE = np.array([[0, 0, -2.5, 30], [0.9, 0, 0, -12], [0, -0.9, 0, 44], [0, 0, 0, 1]])
SFORM = AFFINE + [[0, 0, 0, 1.5], [0] * 4, [0] * 4, [0] * 4]  # qform and sform differ
GEOTAGS = {
    33550: (10.0, 10.0, 0.0),
    33922: (0.0, 0.0, 0.0, 500000.0, 4600000.0, 0.0),
    34735: (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633),
    34737: "WGS 84 / UTM zone 33N|",
}
# The same place given by a ModelTransformation, with GeoDoubleParams.
TRANSFORMED = {
    34264: (10.0, 0.0, 0.0, 500000.0, 0.0, -10.0, 0.0, 4600000.0) + (0.0,) * 7 + (1.0,),
    34735: (1, 1, 0, 2, 1024, 0, 1, 1, 2057, 34736, 1, 0),
    34736: (6378137.0,),
}
GEOTAG_TYPES = {33550: "d", 33922: "d", 34264: "d", 34735: "H", 34736: "d", 34737: "s"}
METADATA = (
    '<GDALMetadata><Item name="AREA">north</Item>'
    '<Item name="SCALE" sample="0" role="scale">0.01</Item></GDALMetadata>'
)


@pytest.fixture
def nifti(tmp_path):
    image = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), SFORM)  # nibabel saves this one
    image.header.set_qform(AFFINE, 1)
    image.header.set_sform(SFORM, 2)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_slope_inter(2.0, -1.0)  # the input's scaling is not the output's
    path = tmp_path / "in.nii.gz"
    nib.save(image, path)
    return path


def _write(path, geometry, data, **kw):
    out = create_output(path, data.shape, data.dtype, geometry=geometry, **kw)
    out.array[...] = data
    return out.finish()


@pytest.mark.parametrize("channels", [0, 3])
def test_nifti_output_keeps_affine_codes_zooms_and_units(nifti, tmp_path, channels):
    shape = (channels, 6, 5, 4) if channels else (6, 5, 4)
    data = np.random.default_rng(0).random(shape).astype(np.float16 if channels else np.uint8)
    got = nib.load(_write(tmp_path / "out.nii.gz", read_geometry(nifti), data))
    source = nib.load(nifti).header
    assert source.get_qform(coded=True)[1] == 1 and source.get_sform(coded=True)[1] == 2
    np.testing.assert_allclose(got.affine, nib.load(nifti).affine, atol=1e-6)
    for coded in ("get_qform", "get_sform"):
        (want, want_code), (have, have_code) = (getattr(h, coded)(coded=True)
                                                for h in (source, got.header))  # fmt: skip
        assert have_code == want_code
        np.testing.assert_allclose(have, want, atol=1e-6)
    assert got.header.get_sform(coded=True)[1] == 2 and got.header.get_qform(coded=True)[1] == 1
    assert got.header.get_zooms() == source.get_zooms() + ((1.0,) if channels else ())
    assert got.header.get_xyzt_units() == ("mm", "sec")
    assert got.header.get_slope_inter() == (None, None)
    assert got.get_data_dtype() == (np.float32 if channels else np.uint8)
    want = np.moveaxis(data, 0, -1) if channels else data
    np.testing.assert_array_equal(np.asarray(got.dataobj), want.astype(got.get_data_dtype()))


def _geotiff(path, tags):
    bands = np.random.default_rng(1).integers(0, 4000, (4, 300, 211), dtype=np.uint16)
    extratags = [(code, GEOTAG_TYPES.get(code, "s"), 0 if isinstance(v, str) else len(v), v, True)
                 for code, v in tags.items()]  # fmt: skip
    tifffile.imwrite(path, bands, tile=(64, 64), compression="lzw", planarconfig="separate",
                     photometric="minisblack", extratags=extratags)  # fmt: skip
    return bands


def test_lzw_tiled_four_band_geotiff_reads(tmp_path):
    bands = _geotiff(tmp_path / "in.tif", GEOTAGS)
    assert tifffile.TiffFile(tmp_path / "in.tif").pages[0].compression == tifffile.COMPRESSION.LZW
    got = open_image(tmp_path / "in.tif", 2, 4)
    np.testing.assert_array_equal(got[:, 100:180, 7:70], bands[:, 100:180, 7:70])


def _tags(path):
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return {t.code: t.value for t in page.tags}, page


@pytest.mark.parametrize("geotags", [GEOTAGS, TRANSFORMED], ids=["tiepoint", "transform"])
@pytest.mark.parametrize("channels", [0, 3])
def test_geotiff_output_keeps_the_geotags_tiled_and_deflated(tmp_path, channels, geotags):
    _geotiff(tmp_path / "in.tif", {**geotags, 42113: "0", 42112: METADATA})
    geometry = read_geometry(tmp_path / "in.tif")
    shape = (channels, 300, 211) if channels else (300, 211)
    data = np.random.default_rng(2).random(shape).astype(np.float16 if channels else np.uint8)
    nodata = float("nan") if channels else 255
    path = _write(tmp_path / "out.tif", geometry, data, nodata=nodata)
    tags, page = _tags(path)
    for code, value in geotags.items():
        assert tags[code] == value, code
    assert tags[42113] == ("nan" if channels else "255")
    assert "AREA" in tags[42112] and "SCALE" not in tags[42112]  # per-band items dropped
    assert page.compression in (tifffile.COMPRESSION.ADOBE_DEFLATE, tifffile.COMPRESSION.DEFLATE)
    assert page.is_tiled and page.tilewidth % 16 == 0 and page.tilelength % 16 == 0
    if channels:
        assert page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
        assert page.samplesperpixel == channels
    np.testing.assert_array_equal(tifffile.imread(path), data)


def test_zarr_output_copies_the_attributes(tmp_path):
    attrs = {"multiscales": [{"axes": ["c", "y", "x"]}], "spacing": [0.5, 0.5]}
    zarr.create_array(tmp_path / "in.zarr", shape=(2, 8, 8), dtype="f4", attributes=attrs)
    path = _write(tmp_path / "out.zarr", read_geometry(tmp_path / "in.zarr"),
                  np.ones((8, 8), np.uint8))  # fmt: skip
    assert zarr.open_array(path, mode="r").attrs.asdict() == attrs


def test_npy_has_no_geometry(tmp_path):
    np.save(tmp_path / "in.npy", np.zeros((4, 4)))
    assert read_geometry(tmp_path / "in.npy") == Geometry() and Geometry().empty


def test_geometry_of_another_kind_is_lost_with_a_warning(nifti, tmp_path, caplog):
    data = np.arange(30, dtype=np.uint8).reshape(6, 5)
    with caplog.at_level(logging.WARNING, logger="haloseg.inference.io"):
        path = _write(tmp_path / "out.tif", read_geometry(nifti), data, nodata=255)
    assert "NIfTI geometry of" in caplog.text and "out.tif" in caplog.text
    tags, _ = _tags(path)
    assert 33550 not in tags and tags[42113] == "255"
    np.testing.assert_array_equal(tifffile.imread(path), data)


def test_nodata_outside_the_dtype_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="nodata nan is no uint8 value"):
        create_output(tmp_path / "o.tif", (4, 4), np.uint8, nodata=float("nan"))
