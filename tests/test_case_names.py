"""A site's log names a case by its datalist index, not its file name, unless its privacy scope allows names:
the redaction itself, and a real simulator run (shared with tests/test_site_limits.py is not possible: that run's
sites refuse every task) in which a site logs a data warning and another a data error."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
from conftest import TINY_ENGINE, copy_job, simulate

from fedseg.fl.case_names import CaseRedactor


def test_redactor_names_cases_by_index(tmp_path):
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    datalist = {
        "training": [
            {"image": "img/pat-0003-MRN9999.nii.gz", "label": "img/pat-0003-MRN9999_seg.nii.gz"},
            {"image": ["img/t1.nii.gz", "img/t2.nii.gz"], "label": "img/x_seg.nii.gz"},
        ],
        "testing": [{"image": "img/pat-7.nii.gz", "label": "img/pat-7_seg.nii.gz"}],
    }
    (site / "datalist.json").write_text(json.dumps(datalist))
    redact = CaseRedactor(str(site / "datalist.json"))
    label = site / "img" / "pat-0003-MRN9999_seg.nii.gz"
    assert redact(f"training[0]: label {label} is all background") == "training[0]: label training[0] label is all background"
    assert redact("cannot read pat-7.nii.gz") == "cannot read testing[0] image"
    assert redact(f"{site}/img/t2.nii.gz: bad") == "training[1] image channel 1: bad"
    assert redact("/elsewhere/other-MRN1.nii.gz and datalist.json") == "<case file> and datalist.json"
    assert CaseRedactor(str(site / "datalist.json"), allow_names=True)(str(label)) == str(label)


def test_site_log_names_cases_by_index(tiny2d, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny2d, data)
    site1 = json.loads((data / "site-1" / "datalist.json").read_text())
    empty = data / "site-1" / site1["training"][1]["label"]
    img = nib.load(str(empty))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, dtype=np.uint8), img.affine), str(empty))
    site2 = json.loads((data / "site-2" / "datalist.json").read_text())
    broken = data / "site-2" / site2["validation"][0]["image"]
    broken.write_bytes(b"not a NIfTI file")
    job = copy_job("fedavg", tmp_path / "jobs", server_args={"num_rounds": 1}, engine={**TINY_ENGINE, "local_epochs": 1})
    result = simulate(job, tmp_path / "ws", data, n=2, expect_ok=False, timeout=600)
    assert not result.left
    log1, log2 = result.log("site-1"), result.log("site-2")
    assert "DATA WARNING [site site-1] training[1]: label training[1] label is all background" in log1, log1[-3000:]
    assert "DATA ERROR [site site-2] validation[0] image: cannot read image as NIfTI" in log2, log2[-3000:]
    for name in (empty.name, broken.name):
        assert name not in log1 + log2 + result.errors(), name
