"""A site's log names a case by its datalist index, not its file name, unless its privacy scope allows names:
the redaction itself, and one real simulator run (site-1 with an all-background label, site-2 with an unreadable
image) in which a site logs a data warning, another a data error, and the job stops with a clear message instead
of training without the broken site. (Shared with tests/test_site_limits.py is not possible: that run's sites
refuse every task.)"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
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


@pytest.fixture(scope="module")
def broken_sites(tiny2d, tmp_path_factory):
    """jobs/fedavg on 2 sites (min_clients 2), max_failed_rounds 1, no cross-site evaluation: site-1's
    training[1] label is all background (a warning), site-2's validation[0] image is not a NIfTI file (an error)."""
    tmp = tmp_path_factory.mktemp("broken_sites")
    data = tmp / "data"
    shutil.copytree(tiny2d, data)
    site1 = json.loads((data / "site-1" / "datalist.json").read_text())
    empty = data / "site-1" / site1["training"][1]["label"]
    img = nib.load(str(empty))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, dtype=np.uint8), img.affine), str(empty))
    site2 = json.loads((data / "site-2" / "datalist.json").read_text())
    broken = data / "site-2" / site2["validation"][0]["image"]
    broken.write_bytes(b"not a NIfTI file")
    job = copy_job(
        "fedavg",
        tmp / "jobs",
        server_args={"num_rounds": 3, "max_failed_rounds": 1},
        engine={**TINY_ENGINE, "local_epochs": 1},
    )
    server_file = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_file.read_text())
    server["workflows"] = server["workflows"][:1]
    server_file.write_text(json.dumps(server, indent=2))
    result = simulate(job, tmp / "ws", data, n=2, expect_ok=False, timeout=600)
    return result, empty, broken


def test_site_log_names_cases_by_index(broken_sites):
    result, empty, broken = broken_sites
    assert not result.left
    log1, log2 = result.log("site-1"), result.log("site-2")
    assert "DATA WARNING [site site-1] training[1]: label training[1] label is all background" in log1, log1[-3000:]
    assert "DATA ERROR [site site-2] validation[0] image: cannot read image as NIfTI" in log2, log2[-3000:]
    for name in (empty.name, broken.name):
        assert name not in log1 + log2 + result.errors(), name


def test_corrupt_site_data_stops_the_job_with_a_clear_message(broken_sites):
    result, _, broken = broken_sites
    log = result.log("site-2")
    # the file is named by its datalist index, not its name (no privacy scope lets case names out)
    assert "DATA ERROR [site site-2]" in log and "cannot read" in log and broken.name not in log, log[-3000:]
    server = result.log("server")
    assert "site-2" in server and "EXECUTION_EXCEPTION" in server
    # 2 sites, min_clients 2: a round without site-2 changes nothing, and the job stops after max_failed_rounds
    assert "fewer than min_clients=2" in server and "FedAvg stopped" in server  # instead of training without the site
    history = json.loads((result.job_dir / "app_server" / "fedavg" / "history.json").read_text())
    # site-1's warning does not keep it out: it trains and is accepted in the one round there is
    assert [(r["round"], r["answered"], r["accepted"]) for r in history] == [(0, ["site-1"], ["site-1"])]
