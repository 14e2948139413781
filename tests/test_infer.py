"""`python -m fedseg.infer`: results written on the input image's grid (MONAI SaveImage), and the global model of a
real FedAvg run segments new images with the Dice the job itself measured."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import CUSTOM, TINY_ENGINE, copy_job, simulate

from fedseg.data import load_datalist
from fedseg.inference_io import write_nifti_like
from fedseg.report import load_results


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


def _infer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedseg.infer", "global", *args],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(CUSTOM), "OMP_NUM_THREADS": "1"},
        timeout=600,
    )


def test_global_model_of_a_fedavg_run_segments_new_images(tiny2d, tmp_path):
    job = copy_job("fedavg", tmp_path, server_args={"num_rounds": 2}, engine={**TINY_ENGINE, "local_epochs": 1})
    result = simulate(job, tmp_path / "ws", tiny2d, n=3)
    best = result.job_dir / "app_server" / "fedavg" / "best.pt"
    assert best.is_file()
    datalist = tiny2d / "site-1" / "datalist.json"

    proc = _infer("--models", str(best), "--input", str(datalist), "--out", str(tmp_path / "dl"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((tmp_path / "dl" / "summary.json").read_text())
    cases = load_datalist(str(datalist))["testing"]
    assert summary["command"] == "global" and summary["method"] == "fedavg" and len(summary["cases"]) == len(cases)
    for case, row in zip(cases, summary["cases"]):
        source, seg = nib.load(case["image"]), nib.load(tmp_path / "dl" / row["segmentation"])
        assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)
        assert seg.get_data_dtype() == np.uint8 and set(np.unique(seg.get_fdata())) <= {0.0, 1.0}
        truth, pred = nib.load(case["label"]).get_fdata() > 0, seg.get_fdata() > 0
        assert row["dice"] == pytest.approx(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1), abs=1e-5)
    # same weights and engine settings as the job's own final test: the same per-case Dice
    job_dice = load_results(result.workspace, "fedavg")["models"]["global (best)"]["site-1"]["dice_per_case"]
    assert [r["dice"] for r in summary["cases"]] == pytest.approx(job_dice, abs=1e-4)

    # moved away from its run, the set has no engine settings next to it: refused by name, then --job-config works
    moved = tmp_path / "moved" / "best.pt"
    moved.parent.mkdir()
    shutil.copy(best, moved)
    refused = _infer("--models", str(moved), "--input", str(tiny2d / "site-2" / "imagesTs"), "--out", str(tmp_path / "x"))
    assert refused.returncode != 0 and str(moved) in refused.stderr and "--job-config" in refused.stderr
    folder = tmp_path / "folder"
    proc = _infer(
        "--models", str(moved), "--job-config", str(job), "--input", str(tiny2d / "site-2" / "imagesTs"), "--out", str(folder)
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    images = sorted(p.name for p in (tiny2d / "site-2" / "imagesTs").glob("*.nii.gz"))
    assert sorted(p.name for p in folder.glob("*_seg.nii.gz")) == [n.replace(".nii.gz", "_seg.nii.gz") for n in images]
    assert all("dice" not in r for r in json.loads((folder / "summary.json").read_text())["cases"])
