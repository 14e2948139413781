"""Image intensities that the engine's float32 normalisation cannot handle are refused before training; a
constant image is reported."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from fedseg.data import DataValidationError, load_datalist, validate_site_data
from fedseg.data.synthetic import generate_dataset


@pytest.fixture(scope="module")
def one_site(tmp_path_factory):
    out = tmp_path_factory.mktemp("range") / "gen"
    generate_dataset(out, n_sites=1, spatial_dims=2, seed=0, size="tiny")
    return out / "site-1"


@pytest.fixture
def site(one_site, tmp_path):
    shutil.copytree(one_site, tmp_path / "site-1")
    path = tmp_path / "site-1" / "datalist.json"
    return path, load_datalist(str(path))


def resave(path, data):
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


def test_values_that_overflow_float32_normalisation_are_refused(site):
    path, dl = site
    image = dl["training"][2]["image"]
    data = np.asarray(nib.load(image).dataobj).astype(np.float32)
    huge = data.copy()
    huge[0, 0] = 3e38  # finite in float32, but its square (std in the normalisation) is not
    resave(image, huge)
    with pytest.raises(DataValidationError) as caught:
        validate_site_data(str(path), "site-1")
    error = caught.value
    assert (error.site, error.file) == ("site-1", image)
    assert "3e+38" in error.problem and "float32" in error.problem, error.problem
    # the same image, scaled into a range float32 handles, passes
    resave(image, data * 1e6)
    assert validate_site_data(str(path), "site-1")["warnings"] == []


def test_a_constant_image_is_reported_not_refused(site):
    path, dl = site
    image = dl["validation"][0]["image"]
    data = np.asarray(nib.load(image).dataobj)
    resave(image, np.full_like(data, 7, dtype=np.float32))
    warnings = validate_site_data(str(path), "site-1")["warnings"]
    assert len(warnings) == 1 and "validation[0]" in warnings[0] and "constant" in warnings[0], warnings
    assert image in warnings[0]
