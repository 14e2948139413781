"""`python -m fedseg.infer`: results written on the input image's grid (MONAI SaveImage). That the global model of a
real FedAvg run segments new images with the Dice the job itself measured is shown in tests/test_export.py, on the
FedAvg run its bundles are exported from."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from fedseg.inference_io import write_nifti_like


def _oblique_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """A rotated, anisotropic, shifted grid: what a scanner writes and what must survive the round trip."""
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = [-12.5, 40.25, 7.0]
    return affine


@pytest.mark.parametrize("shape", [(20, 14), (12, 10, 6)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_written_results_keep_the_input_grid(shape, dtype, tmp_path):
    affine = _oblique_affine((0.7, 1.3, 2.5))
    source = nib.Nifti1Image(np.random.default_rng(0).normal(size=shape).astype(np.float32), affine)
    source.header.set_xyzt_units("mm", "sec")
    nib.save(source, tmp_path / "case.nii.gz")
    array = (np.random.default_rng(1).random(shape) * (2 if dtype == np.uint8 else 1)).astype(dtype)

    out = write_nifti_like(tmp_path / "case.nii.gz", array, tmp_path / "out" / "case_seg.nii.gz")

    assert out == tmp_path / "out" / "case_seg.nii.gz" and sorted(p.name for p in out.parent.iterdir()) == [out.name]
    written = nib.load(out)
    assert written.shape == shape and written.get_data_dtype() == np.dtype(dtype)
    assert np.allclose(written.affine, affine, atol=1e-5)
    assert np.allclose(written.header.get_zooms()[: len(shape)], (0.7, 1.3, 2.5)[: len(shape)], atol=1e-5)
    assert written.header.get_xyzt_units()[0] == "mm"
    assert int(written.header["sform_code"]) > 0 and int(written.header["qform_code"]) > 0  # what viewers read
    assert np.array_equal(np.asarray(written.dataobj), array)
    with pytest.raises(ValueError, match="does not match .*case.nii.gz"):
        write_nifti_like(tmp_path / "case.nii.gz", array[:-1], tmp_path / "out" / "bad_seg.nii.gz")
