"""Tests of fedseg.data: generator, validation, datalist resolution and converter, on real files."""

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedseg.data import (
    SECTIONS,
    DataValidationError,
    convert_folder_dataset,
    generate_dataset,
    image_paths,
    load_datalist,
    resolve_site_datalist,
    validate_site_data,
)
from fedseg.data.datalist import atomic_output_dir
from fedseg.data.synthetic import ARCHETYPES

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def run_module(module, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "custom"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def read(path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def all_cases(datalist):
    return [entry for section in SECTIONS for entry in datalist.get(section, [])]


def no_leftovers(parent: Path, name: str) -> bool:
    return not [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen2d(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "gen2d"
    return out, generate_dataset(out, n_sites=4, spatial_dims=2, seed=0, size="tiny")


@pytest.fixture(scope="module")
def gen3d(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "gen3d"
    return out, generate_dataset(out, n_sites=4, spatial_dims=3, seed=0, size="tiny")


def test_generator_writes_sites_datalists_and_summary(gen2d):
    out, summary = gen2d
    assert json.loads((out / "dataset.json").read_text()) == summary
    assert [s["site"] for s in summary["sites"]] == ["site-1", "site-2", "site-3", "site-4"]
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "site-1", "site-2", "site-3", "site-4"]
    for s in summary["sites"]:
        datalist = json.loads((out / s["datalist"]).read_text())
        assert datalist["site"] == s["site"]
        assert (datalist["num_classes"], datalist["spatial_dims"], datalist["in_channels"]) == (2, 2, 1)
        assert datalist["labels"] == {"0": "background", "1": "target"}
        assert {k: len(datalist[k]) for k in SECTIONS} == s["counts"]
        for entry in all_cases(datalist):  # relative paths, files present
            assert not os.path.isabs(entry["image"]) and (out / s["site"] / entry["image"]).is_file()
            assert (out / s["site"] / entry["label"]).is_file()
    training_counts = [s["counts"]["training"] for s in summary["sites"]]
    assert len(set(training_counts)) == 4, "sites should have different numbers of cases"


@pytest.mark.parametrize("dims", [2, 3])
def test_generated_sites_validate(dims, gen2d, gen3d):
    out, summary = gen2d if dims == 2 else gen3d
    for s in summary["sites"]:
        report = validate_site_data(str(out / s["datalist"]), s["site"])
        assert report["site"] == s["site"] and report["spatial_dims"] == dims and report["in_channels"] == 1
        assert report["counts"] == s["counts"]
        assert report["num_classes"] == 2
        assert sum(report["label_fractions"].values()) == pytest.approx(1.0)
        assert report["label_fractions"]["1"] == pytest.approx(s["measured"]["foreground_fraction"], abs=1e-4)
        assert report["shape_min"] == s["shape"] and len(report["spacing"]) == dims


def test_generator_is_deterministic(gen2d, tmp_path):
    out, summary = gen2d
    again = generate_dataset(tmp_path / "again", n_sites=4, spatial_dims=2, seed=0, size="tiny")
    other = generate_dataset(tmp_path / "other", n_sites=4, spatial_dims=2, seed=1, size="tiny")
    assert again == summary
    assert other["sites"][0]["params"] != summary["sites"][0]["params"]
    for site in ("site-1", "site-3"):
        assert (out / site / "datalist.json").read_bytes() == (tmp_path / "again" / site / "datalist.json").read_bytes()
        datalist = load_datalist(str(out / site / "datalist.json"))
        for entry in all_cases(datalist)[:4]:
            for key in ("image", "label"):
                rel = os.path.relpath(entry[key], out)
                a, b, c = read(out / rel)[0], read(tmp_path / "again" / rel)[0], read(tmp_path / "other" / rel)[0]
                assert a.dtype == b.dtype and np.array_equal(a, b)
                assert Path(out / rel).read_bytes() == Path(tmp_path / "again" / rel).read_bytes()
                if key == "image":
                    assert not np.array_equal(a, c), "a different seed must give different images"


def test_affines_differ_per_site_and_match_within_a_case(gen2d, gen3d):
    for out, summary in (gen2d, gen3d):
        site_affines = []
        for s in summary["sites"]:
            datalist = load_datalist(str(out / s["datalist"]))
            for entry in all_cases(datalist):
                image, image_affine = read(entry["image"])
                label, label_affine = read(entry["label"])
                assert image.dtype == np.float32 and label.dtype == np.uint8
                assert image.shape == label.shape == tuple(s["shape"])
                assert np.array_equal(image_affine, label_affine)
            spacing = np.sqrt((image_affine[:3, :3] ** 2).sum(axis=0))
            assert np.allclose(spacing[: len(s["shape"])], s["spacing_mm"], atol=1e-3)
            assert np.allclose(np.diag(np.diag(image_affine[:3, :3])), image_affine[:3, :3]), "diagonal spacing"
            site_affines.append(image_affine)
        for i in range(len(site_affines)):
            for j in range(i):
                assert not np.allclose(site_affines[i], site_affines[j])


def test_sites_differ_measurably(gen2d):
    out, summary = gen2d
    sites = summary["sites"]
    means = [s["measured"]["intensity_mean"] for s in sites]
    foreground = [s["measured"]["foreground_fraction"] for s in sites]
    spacings = [s["spacing_mm"][0] for s in sites]
    shapes = [tuple(s["shape"]) for s in sites]
    assert max(means) / max(min(abs(m) for m in means), 1e-6) > 100, "intensity scales differ by orders of magnitude"
    assert max(foreground) > 2.5 * min(foreground), "site-4 has much smaller targets"
    assert len(set(spacings)) == 4 and len(set(shapes)) >= 3
    # The archetypes are what the README describes: site-2 low contrast, site-3 darker targets.
    assert sites[1]["params"]["contrast"] < sites[0]["params"]["contrast"]
    assert sites[2]["params"]["contrast"] < 0 < sites[0]["params"]["contrast"]
    assert sites[2]["params"]["bias"] > 3 * sites[0]["params"]["bias"]
    assert foreground.index(min(foreground)) == 3


def test_generator_multiclass_multichannel_and_extra_sites(tmp_path):
    summary = generate_dataset(
        tmp_path / "mc",
        n_sites=6,
        spatial_dims=2,
        seed=3,
        num_classes=3,
        size="tiny",
        cases_per_site=[3, 2, 2, 2, 2, 4],
        in_channels=2,
    )
    assert [s["counts"]["training"] for s in summary["sites"]] == [3, 2, 2, 2, 2, 4]
    for s in summary["sites"][4:]:  # sites beyond the archetypes stay within their ranges
        for key in ("noise", "bias", "spacing_ref", "radius_mm"):
            values = [a[key] for a in ARCHETYPES]
            assert min(values) * 0.99 <= s["params"][key] <= max(values) * 1.01
    seen = set()
    for s in summary["sites"]:
        report = validate_site_data(str(tmp_path / "mc" / s["datalist"]), s["site"])
        assert report["in_channels"] == 2 and report["num_classes"] == 3
        datalist = load_datalist(str(tmp_path / "mc" / s["datalist"]))
        entry = datalist["training"][0]
        assert isinstance(entry["image"], list) and len(entry["image"]) == 2
        assert entry["image"][0].endswith("_0000.nii.gz") and entry["image"][1].endswith("_0001.nii.gz")
        c0, c1 = read(entry["image"][0])[0], read(entry["image"][1])[0]
        assert c0.shape == c1.shape and not np.array_equal(c0, c1)
        label = read(entry["label"])[0]
        seen |= set(np.unique(label).tolist())
        core, target = label == 2, label >= 1
        if core.any():  # the core lies inside the target
            assert target[core].all() and core.sum() < target.sum()
    assert seen == {0, 1, 2}


def test_generator_cli_and_existing_output(tmp_path):
    result = run_module(
        "fedseg.data.synthetic",
        "--out",
        tmp_path / "cli",
        "--sites",
        2,
        "--dims",
        3,
        "--size",
        "tiny",
        "--cases",
        "2,3",
        "--seed",
        5,
    )
    assert result.returncode == 0, result.stderr
    assert "site-2: 3/1/1 cases" in result.stdout
    summary = json.loads((tmp_path / "cli" / "dataset.json").read_text())
    assert summary["spatial_dims"] == 3 and summary["seed"] == 5
    with pytest.raises(FileExistsError):
        generate_dataset(tmp_path / "cli", n_sites=1, size="tiny")
    generate_dataset(tmp_path / "cli", n_sites=1, size="tiny", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["dataset.json", "site-1"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "half-written.nii.gz").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_monai_reads_the_on_disk_convention(gen3d, tmp_path):
    """LoadImaged + EnsureChannelFirstd, no options, give (K, *spatial) images and (1, *spatial) labels."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    load = Compose([LoadImaged(keys=["image", "label"], image_only=True), EnsureChannelFirstd(keys=["image", "label"])])
    generate_dataset(tmp_path / "two", n_sites=1, size="tiny", cases_per_site=1, in_channels=2)
    out3d, summary3d = gen3d
    cases = [
        (load_datalist(str(out3d / "site-1" / "datalist.json"))["training"][0], 1, summary3d["sites"][0]["shape"]),
        (load_datalist(str(tmp_path / "two" / "site-1" / "datalist.json"))["training"][0], 2, [32, 32]),
    ]
    for entry, channels, shape in cases:
        data = load(dict(entry))
        assert tuple(data["image"].shape) == (channels, *shape)
        assert tuple(data["label"].shape) == (1, *shape)
        first = read(image_paths(entry)[0])[0]
        assert np.allclose(data["image"][0].numpy(), first)


# ---------------------------------------------------------------------------------------------
# Validation errors: copy a tiny generated site, break one file, expect a precise error
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def site_copy(gen2d, tmp_path):
    out, _ = gen2d
    shutil.copytree(out / "site-1", tmp_path / "site-1")
    path = tmp_path / "site-1" / "datalist.json"
    return path, load_datalist(str(path))


def resave(path, data=None, affine=None):
    old_data, old_affine = read(path)
    nib.save(nib.Nifti1Image(old_data if data is None else data, old_affine if affine is None else affine), str(path))


def break_missing_datalist(path, dl):
    path.unlink()
    return path, ["datalist file not found"]


def break_invalid_json(path, dl):
    path.write_text('{"training": [')
    return path, ["invalid JSON", "line 1"]


def break_not_an_object(path, dl):
    path.write_text("[1, 2]")
    return path, ["must be a JSON object"]


def break_empty_training(path, dl):
    raw = json.loads(path.read_text())
    raw["training"] = []
    path.write_text(json.dumps(raw))
    return path, ['"training" list is empty']


def break_entry_without_image(path, dl):
    raw = json.loads(path.read_text())
    del raw["validation"][1]["image"]
    path.write_text(json.dumps(raw))
    return path, ['validation[1] has no "image"']


def break_missing_image(path, dl):
    victim = Path(dl["training"][2]["image"])
    victim.unlink()
    return victim, ["image file not found"]


def break_missing_label(path, dl):
    victim = Path(dl["validation"][0]["label"])
    victim.unlink()
    return victim, ["label file not found"]


def break_garbage_nifti(path, dl):
    victim = Path(dl["training"][1]["image"])
    victim.write_bytes(np.random.default_rng(0).bytes(2000))
    return victim, ["cannot read image as NIfTI", "corrupt"]


def break_truncated_nifti(path, dl):
    # The header still reads (nib.load succeeds); the voxel data ends early.
    victim = Path(dl["training"][3]["label"])
    raw = gzip.decompress(victim.read_bytes())
    victim.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return victim, ["cannot read label as NIfTI", "truncated"]


def break_shape_mismatch(path, dl):
    victim = Path(dl["training"][0]["label"])
    label, _ = read(victim)
    resave(victim, data=np.ascontiguousarray(label[:, :-4]))
    return victim, ["label shape (32, 28) does not match image shape (32, 32)", dl["training"][0]["image"]]


def break_affine_mismatch(path, dl):
    victim = Path(dl["training"][4]["label"])
    _, affine = read(victim)
    shifted = affine.copy()
    shifted[0, 3] += 2.5
    resave(victim, affine=shifted)
    return victim, ["label affine does not match image affine", "largest difference 2.5"]


def break_label_out_of_range(path, dl):
    victim = Path(dl["training"][5]["label"])
    label, _ = read(victim)
    label = label.copy()
    label[0, 0], label[1, 1] = 3, 7
    resave(victim, data=label)
    return victim, ["label values [3, 7] are outside 0..1", "num_classes=2"]


def break_non_integer_label(path, dl):
    victim = Path(dl["training"][0]["label"])
    label, _ = read(victim)
    label = label.astype(np.float32)
    label[2, 2] = 0.5
    resave(victim, data=label)
    return victim, ["non-integer values", "0.5"]


def break_nan_in_image(path, dl):
    victim = Path(dl["testing"][2]["image"])  # the testing section is checked too
    image, _ = read(victim)
    image = image.copy()
    image[3, 4:7] = np.nan
    image[0, 0] = np.inf
    resave(victim, data=image)
    return victim, ["image has 4 NaN/Inf voxel(s) out of 1024"]


def break_2d_image_stored_as_3d(path, dl):
    victim = Path(dl["training"][1]["image"])
    image, _ = read(victim)
    resave(victim, data=image[..., None])
    return victim, ["image has shape (32, 32, 1)", "not a 2-D image"]


@pytest.mark.parametrize(
    "breaker",
    [
        break_missing_datalist,
        break_invalid_json,
        break_not_an_object,
        break_empty_training,
        break_entry_without_image,
        break_missing_image,
        break_missing_label,
        break_garbage_nifti,
        break_truncated_nifti,
        break_shape_mismatch,
        break_affine_mismatch,
        break_label_out_of_range,
        break_non_integer_label,
        break_nan_in_image,
        break_2d_image_stored_as_3d,
    ],
    ids=lambda f: f.__name__[len("break_") :],
)
def test_validation_names_site_file_and_problem(site_copy, breaker):
    path, dl = site_copy
    validate_site_data(str(path), "site-1")  # intact before breaking
    victim, problem_parts = breaker(path, dl)
    with pytest.raises(DataValidationError) as caught:
        validate_site_data(str(path), "site-1")
    error = caught.value
    assert error.site == "site-1"
    assert error.file == str(victim)
    for part in problem_parts:
        assert part in error.problem
    assert str(error) == f"[site site-1] {victim}: {error.problem}"
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))  # errors cross process boundaries intact
    assert (copy.site, copy.file, copy.problem, str(copy)) == (error.site, error.file, error.problem, str(error))


def test_num_classes_argument_overrides_datalist(site_copy):
    path, dl = site_copy
    victim = Path(dl["training"][0]["label"])
    label, _ = read(victim)
    label = label.copy()
    label[0, 0] = 2
    resave(victim, data=label)
    report = validate_site_data(str(path), "site-1", num_classes=3)
    assert report["num_classes"] == 3 and set(report["label_fractions"]) == {"0", "1", "2"}
    with pytest.raises(DataValidationError, match=r"label values \[2\] are outside 0\.\.1"):
        validate_site_data(str(path), "site-1")


def test_validation_sections_and_check_files(site_copy):
    path, dl = site_copy
    Path(dl["testing"][0]["image"]).unlink()
    report = validate_site_data(str(path), "site-1", sections=("training", "validation"))
    assert report["counts"] == {"training": 6, "validation": 2}
    assert validate_site_data(str(path), "site-1", check_files=False)["counts"]["testing"] == 3
    with pytest.raises(DataValidationError, match="image file not found"):
        validate_site_data(str(path), "site-1")


def test_load_datalist_resolves_relative_and_keeps_absolute_paths(site_copy, tmp_path):
    path, dl = site_copy
    raw = json.loads(path.read_text())
    absolute = dl["training"][0]["image"]
    raw["training"][0]["image"] = absolute
    raw.pop("validation")  # optional sections may be absent
    moved = tmp_path / "elsewhere" / "datalist.json"
    moved.parent.mkdir()
    moved.write_text(json.dumps(raw))
    loaded = load_datalist(str(moved), "site-1")
    assert loaded["training"][0]["image"] == absolute
    assert loaded["training"][1]["image"] == str(tmp_path / "elsewhere" / raw["training"][1]["image"])
    assert "validation" not in loaded and raw["training"][1]["image"].startswith("imagesTr/")


# ---------------------------------------------------------------------------------------------
# Validation: datalist-level checks and the gaps found in review
# ---------------------------------------------------------------------------------------------


def edit_datalist(path: Path, change) -> dict:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))
    return raw


def refused(path, *parts, file=None, **kwargs):
    """validate_site_data must refuse with a message naming site-1, `file` (default: the datalist) and parts."""
    with pytest.raises(DataValidationError) as caught:
        validate_site_data(str(path), "site-1", **kwargs)
    error = caught.value
    assert (error.site, error.file) == ("site-1", str(file or path)), str(error)
    for part in parts:
        assert part in error.problem, error.problem
    return error


def test_intact_site_has_no_warnings(site_copy):
    path, _ = site_copy
    assert validate_site_data(str(path), "site-1")["warnings"] == []  # name, site, description are known keys


def test_duplicate_cases_are_refused(site_copy):
    path, dl = site_copy
    original = path.read_text()
    raw = edit_datalist(path, lambda d: d["training"].append(dict(d["training"][1])))
    image, label = dl["training"][1]["image"], dl["training"][1]["label"]
    refused(
        path,
        "listed more than once",
        f"training[1] and training[6] use the same image {image} and label {label}",
        check_files=False,
    )
    # The same case in training and testing, written differently (./ and an absolute path).
    path.write_text(original)
    edit_datalist(
        path,
        lambda d: d["testing"].__setitem__(
            0, {"image": "./" + raw["training"][2]["image"], "label": dl["training"][2]["label"]}
        ),
    )
    refused(path, "training[2] and testing[0] use the same image", "and label")
    # Only the label file is shared (a copy-paste slip).
    path.write_text(original)
    edit_datalist(path, lambda d: d["validation"][0].__setitem__("label", raw["training"][3]["label"]))
    refused(path, f"training[3] and validation[0] use the same label {dl['training'][3]['label']}")
    # A symlink to a listed file is the same file.
    path.write_text(original)
    os.symlink(dl["training"][0]["image"], path.parent / "imagesTr" / "link.nii.gz")
    edit_datalist(path, lambda d: d["testing"][1].__setitem__("image", "imagesTr/link.nii.gz"))
    refused(path, "training[0] and testing[1] use the same image")
    # One case giving the same file as two channels.
    path.write_text(original)
    edit_datalist(path, lambda d: d["training"][0].__setitem__("image", [d["training"][0]["image"]] * 2))
    refused(path, f"training[0] lists image {dl['training'][0]['image']} twice", check_files=False)


def test_empty_labels_warn_and_all_empty_training_is_refused(site_copy):
    path, dl = site_copy

    def empty(entry):
        label = Path(entry["label"])
        resave(label, data=np.zeros_like(read(label)[0]))

    empty(dl["training"][4])
    empty(dl["validation"][1])
    report = validate_site_data(str(path), "site-1")
    assert report["warnings"] == [
        f"training[4]: label {dl['training'][4]['label']} is all background (no foreground voxel)",
        f"validation[1]: label {dl['validation'][1]['label']} is all background (no foreground voxel)",
    ]
    for entry in dl["training"]:
        empty(entry)
    refused(path, "every training label (6) is all background", "nothing to learn")


@pytest.mark.parametrize(
    "wrong, right",
    [("trainig", "training"), ("valdation", "validation"), ("test", "testing"), ("Testing", "testing"), ("val", "validation")],
)
def test_misspelled_section_is_refused_with_a_hint(site_copy, wrong, right):
    path, _ = site_copy

    def rename(d):
        d[wrong] = d.pop(right)
        if right == "training":  # keep a training list so that only the misspelling is wrong
            d["training"] = d[wrong][:2]

    edit_datalist(path, rename)
    refused(path, f'unknown section "{wrong}"', f'did you mean "{right}"?', "would be ignored", check_files=False)


def test_unknown_keys_holding_cases_are_refused_descriptive_ones_warn(site_copy):
    path, _ = site_copy
    original = path.read_text()
    edit_datalist(path, lambda d: d.__setitem__("extra_cases", d["testing"][:1]))
    error = refused(path, 'unknown section "extra_cases"', "training, validation, testing")
    assert "did you mean" not in error.problem
    path.write_text(original)
    edit_datalist(path, lambda d: d.update(comment="scanner B, 2023", num_clases=3))
    warnings = validate_site_data(str(path), "site-1")["warnings"]
    assert len(warnings) == 2
    assert warnings[0].startswith('unknown key "comment" is ignored; known keys: ')
    assert warnings[1].startswith('unknown key "num_clases" is ignored (did you mean "num_classes"?)')


@pytest.mark.parametrize("section", ["testing", "validation", "training"])
def test_unlabelled_cases_are_refused_in_every_section(site_copy, section):
    path, _ = site_copy
    edit_datalist(path, lambda d: d[section][1].pop("label"))
    refused(path, f'{section}[1] has no "label"', check_files=False)


def test_paths_outside_the_datalist_folder_are_refused(site_copy, tmp_path):
    path, dl = site_copy
    original = path.read_text()
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(dl["training"][0]["image"], outside / "a.nii.gz")
    shutil.copy(dl["training"][0]["label"], outside / "a_label.nii.gz")
    # ../, an absolute path elsewhere, a symlinked file and a symlinked folder: all real files, all outside.
    os.symlink(outside / "a.nii.gz", path.parent / "imagesTr" / "linked.nii.gz")
    os.symlink(outside, path.parent / "linked_dir")
    cases = [
        ("training", "image", "../outside/a.nii.gz", outside / "a.nii.gz"),
        ("testing", "label", str(outside / "a_label.nii.gz"), outside / "a_label.nii.gz"),
        ("validation", "image", "imagesTr/linked.nii.gz", path.parent / "imagesTr" / "linked.nii.gz"),
        ("training", "label", "linked_dir/a_label.nii.gz", path.parent / "linked_dir" / "a_label.nii.gz"),
        ("training", "image", "imagesTr/../../outside/a.nii.gz", outside / "a.nii.gz"),
    ]
    for section, key, value, shown in cases:
        path.write_text(original)
        edit_datalist(path, lambda d, s=section, k=key, v=value: d[s][0].__setitem__(k, v))
        refused(
            path,
            f"{section}[0] {key} lies outside the datalist's folder {path.parent}",
            f"resolves to {os.path.realpath(shown)}",
            file=shown,
            check_files=False,
        )
    # A symlink that stays inside the folder is fine.
    path.write_text(original)
    os.replace(dl["testing"][0]["image"], path.parent / "kept.nii.gz")
    os.symlink(path.parent / "kept.nii.gz", dl["testing"][0]["image"])
    validate_site_data(str(path), "site-1")


def write_header_only(path: Path, shape, header=nib.Nifti2Header):
    """A few hundred bytes of gzip: a NIfTI header declaring `shape` (uint8) followed by 64 data bytes."""
    hdr = header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape(shape)
    offset = len(hdr.binaryblock) + 4
    hdr.set_data_offset(offset)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + bytes(64)))


@pytest.mark.parametrize(
    "shape, header",
    [((100000, 100000, 100000), nib.Nifti2Header), ((32767, 32767, 32767), nib.Nifti1Header)],
    ids=["nifti2-1e15", "nifti1-3.5e13"],
)
def test_huge_declared_volume_is_refused_from_the_header(site_copy, shape, header):
    path, dl = site_copy
    victim = Path(dl["training"][3]["label"])
    write_header_only(victim, shape, header)
    assert victim.stat().st_size < 1000 and nib.load(str(victim)).shape == shape
    voxels = int(np.prod(shape, dtype=object))
    refused(
        path,
        f"label header declares shape {shape} = {voxels} voxels",
        "limit of 134217728 (max_voxels)",
        "before reading",
        file=victim,
    )


def test_max_voxels_is_configurable(site_copy):
    path, dl = site_copy  # 32 x 32 images: 1024 voxels
    validate_site_data(str(path), "site-1", max_voxels=1024)
    refused(
        path,
        "image header declares shape (32, 32) = 1024 voxels",
        "limit of 1000",
        file=dl["training"][0]["image"],
        max_voxels=1000,
    )


# ---------------------------------------------------------------------------------------------
# Where the datalist comes from
# ---------------------------------------------------------------------------------------------


def write_site_config(workspace: Path, value=None, **settings):
    (workspace / "local").mkdir(parents=True, exist_ok=True)
    config = {"other": 1, **settings} if value is None else {"datalist": value, "other": 1, **settings}
    (workspace / "local" / "fedseg_site.json").write_text(json.dumps(config))


ALLOW = {"FEDSEG_ALLOW_JOB_DATALIST": "1"}


def test_resolve_precedence_env_then_local_then_job(tmp_path):
    workspace = tmp_path / "ws"
    write_site_config(workspace, "/data/local/{SITE_NAME}.json", allow_job_datalist=True, data_root="/job")
    env = {"FEDSEG_DATALIST": "/data/env/{SITE_NAME}/datalist.json", **ALLOW, "FEDSEG_DATA": "/job"}
    assert resolve_site_datalist("site-2", "/job/x.json", str(workspace), env) == "/data/env/site-2/datalist.json"
    env.pop("FEDSEG_DATALIST")
    assert resolve_site_datalist("site-2", "/job/x.json", str(workspace), env) == "/data/local/site-2.json"
    assert resolve_site_datalist("site-2", "/job/{SITE_NAME}.json", str(tmp_path / "no-ws"), env) == "/job/site-2.json"
    assert resolve_site_datalist("site-2", "/job/{SITE_NAME}.json", None, {**env, "FEDSEG_DATALIST": ""}) == "/job/site-2.json"
    # The site's settings still win when the job's path would be refused.
    assert resolve_site_datalist("site-2", "$HOME/../etc", str(workspace), {}) == "/data/local/site-2.json"


def test_resolve_site_settings_expand_variables_and_relative_paths(tmp_path):
    workspace = tmp_path / "ws"
    env = {"DATA": "/mnt/data", "HOME": os.environ.get("HOME", "/root")}
    assert (
        resolve_site_datalist("a", None, None, {**env, "FEDSEG_DATALIST": "$DATA/{SITE_NAME}/dl.json"}) == "/mnt/data/a/dl.json"
    )
    assert resolve_site_datalist("a", None, None, {**env, "FEDSEG_DATALIST": "${DATA}/x.json"}) == "/mnt/data/x.json"
    assert resolve_site_datalist("a", None, None, {**env, "FEDSEG_DATALIST": "~/x.json"}) == os.path.expanduser("~/x.json")
    write_site_config(workspace, "../data/{SITE_NAME}/datalist.json")  # relative to the config file's folder
    assert resolve_site_datalist("a", "/job.json", str(workspace), env) == str(workspace / "data" / "a" / "datalist.json")
    write_site_config(workspace, "$DATA/{SITE_NAME}.json")
    assert resolve_site_datalist("a", "/job.json", str(workspace), env) == "/mnt/data/a.json"


def test_job_datalist_refused_unless_the_site_allows_it(tmp_path):
    workspace = tmp_path / "ws"
    (tmp_path / "data" / "site-3").mkdir(parents=True)
    default = "$FEDSEG_DATA/{SITE_NAME}/datalist.json"  # the executor's default argument
    for ws, env in ((None, {"FEDSEG_DATA": str(tmp_path / "data")}), (str(workspace), {})):
        if ws:
            write_site_config(workspace, data_root=str(tmp_path / "data"))  # a data root alone is no permission
        with pytest.raises(DataValidationError) as caught:
            resolve_site_datalist("site-3", default, ws, env)
        error = caught.value
        assert error.site == "site-3" and default in error.problem
        for way in (
            "FEDSEG_DATALIST",
            '"datalist"',
            "FEDSEG_ALLOW_JOB_DATALIST=1",
            '"allow_job_datalist": true',
            '"data_root"',
        ):
            assert way in error.problem
    for value in ("0", "", "no"):
        with pytest.raises(DataValidationError, match="takes its data location only from its own settings"):
            resolve_site_datalist(
                "site-3", default, None, {"FEDSEG_ALLOW_JOB_DATALIST": value, "FEDSEG_DATA": str(tmp_path / "data")}
            )
    write_site_config(workspace, allow_job_datalist="yes", data_root=str(tmp_path / "data"))
    with pytest.raises(DataValidationError, match='"allow_job_datalist" must be true or false'):
        resolve_site_datalist("site-3", default, str(workspace), {})
    # Permission without a data root: nothing confines the job's path.
    write_site_config(workspace, allow_job_datalist=True)
    with pytest.raises(DataValidationError, match="no data root confines them") as caught:
        resolve_site_datalist("site-3", default, str(workspace), {})
    assert caught.value.file == str(workspace / "local" / "fedseg_site.json")


def test_job_datalist_allowed_inside_the_data_root(tmp_path):
    root = tmp_path / "data"
    (root / "site-1").mkdir(parents=True)
    default = "$FEDSEG_DATA/{SITE_NAME}/datalist.json"
    want = str(root / "site-1" / "datalist.json")
    env = {**ALLOW, "FEDSEG_DATA": str(root)}
    assert resolve_site_datalist("site-1", default, None, env) == want
    assert resolve_site_datalist("site-1", "${FEDSEG_DATA}/{SITE_NAME}/datalist.json", None, env) == want
    assert resolve_site_datalist("site-1", "{SITE_NAME}/datalist.json", None, env) == want  # relative to the root
    assert resolve_site_datalist("site-1", f"{root}/site-1/../site-1/datalist.json", None, env) == want
    # Permission and root from the site's file; the root relative to that file's folder.
    workspace = tmp_path / "ws"
    write_site_config(workspace, allow_job_datalist=True, data_root="../../data")  # from ws/local/
    assert resolve_site_datalist("site-1", default, str(workspace), {}) == want
    # A symlink that stays inside the root is fine; the real path is returned.
    (root / "current").symlink_to(root / "site-1")
    assert resolve_site_datalist("site-1", "$FEDSEG_DATA/current/datalist.json", None, env) == want


def test_job_datalist_cannot_leave_the_data_root(tmp_path):
    root = tmp_path / "data"
    (root / "site-1").mkdir(parents=True)
    (tmp_path / "private").mkdir()
    (root / "site-1" / "escape").symlink_to(tmp_path / "private")
    env = {**ALLOW, "FEDSEG_DATA": str(root)}
    for value in (
        "$FEDSEG_DATA/../private/datalist.json",
        "../private/datalist.json",
        "/etc/passwd",
        "{SITE_NAME}/escape/datalist.json",
        f"{tmp_path}/private/datalist.json",
        "$FEDSEG_DATA/../data2/x",
    ):
        with pytest.raises(DataValidationError) as caught:
            resolve_site_datalist("site-1", value, None, env)
        error = caught.value
        assert (error.site, error.file) == ("site-1", value)
        assert "outside the data root" in error.problem and str(root) in error.problem
        assert "FEDSEG_DATALIST" in error.problem  # says what to configure instead


def test_job_datalist_expands_no_other_variables(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    env = {**ALLOW, "FEDSEG_DATA": str(root), "SECRET_TOKEN": "s3cr3t", "FEDSEG_DATA_X": str(root), "HOME": str(root)}
    for value in (
        "$SECRET_TOKEN/datalist.json",
        "${SECRET_TOKEN}/x.json",
        "$FEDSEG_DATA_X/x.json",
        "$HOME/x.json",
        "$FEDSEG_DATA/$SECRET_TOKEN.json",
        "~/x.json",
        "~root/x.json",
    ):
        with pytest.raises(DataValidationError) as caught:
            resolve_site_datalist("site-1", value, None, env)
        error = caught.value
        assert error.file == value and "s3cr3t" not in str(error)
        assert "not expanded" in error.problem or "are not" in error.problem


def test_resolve_errors(tmp_path):
    with pytest.raises(DataValidationError) as caught:
        resolve_site_datalist("site-3", None, str(tmp_path), {})
    error = caught.value
    assert error.site == "site-3" and error.file == "<no datalist>"
    for way in ("FEDSEG_DATALIST", str(tmp_path / "local" / "fedseg_site.json"), "allow_job_datalist"):
        assert way in error.problem
    write_site_config(tmp_path, "x")
    (tmp_path / "local" / "fedseg_site.json").write_text("{not json")
    with pytest.raises(DataValidationError) as caught:
        resolve_site_datalist("site-3", "/job.json", str(tmp_path), {})
    assert caught.value.file == str(tmp_path / "local" / "fedseg_site.json") and "invalid JSON" in caught.value.problem
    write_site_config(tmp_path, allow_job_datalist=True, data_root=7)
    with pytest.raises(DataValidationError, match='"data_root" must be a folder path'):
        resolve_site_datalist("site-3", "/job.json", str(tmp_path), {})


def test_simulator_sites_take_their_data_from_the_environment(tiny2d, tmp_path):
    """run_simulator(data_root=...) names each site's datalist in the sites' environment (FEDSEG_DATALIST): the
    job's datalist argument, here one this site would refuse, is not used. Without that setting the site refuses
    the job's path, and says so in its log (the two runs side by side: they mostly wait)."""
    from conftest import TINY_ENGINE, copy_job, in_parallel, simulate

    job = copy_job(
        "fedavg",
        tmp_path,
        server_args={"num_rounds": 1},
        engine={**TINY_ENGINE, "local_epochs": 1},
        client_args={"datalist": "$HOME/{SITE_NAME}/datalist.json"},
    )
    runs = in_parallel(
        from_env=lambda: simulate(job, tmp_path / "ws", tiny2d, n=2),
        without=lambda: simulate(job, tmp_path / "ws2", tiny2d, n=2, expect_ok=False, extra_env={"FEDSEG_DATALIST": ""}),
    )
    for site in ("site-1", "site-2"):
        assert f"site {site}: datalist {tiny2d.resolve() / site / 'datalist.json'} OK" in runs["from_env"].log(site)
    log = runs["without"].log("site-1")  # (FLARE itself fills in {SITE_NAME} in the job's configuration)
    assert "DATA ERROR [site site-1] <no datalist>: the job names the datalist '$HOME/site-1/datalist.json'" in log
    assert "FEDSEG_ALLOW_JOB_DATALIST=1" in log and "site site-1: datalist" not in log


# ---------------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------------


def make_picture_dataset(root: Path):
    """siteA: 10 RGB PNG + 0/255 PNG masks; siteB: 6 JPEG pairs (grey mask edges);
    siteC: train/test layout with grey PNGs (3 train, 2 test), folder names image/mask."""
    rng = np.random.default_rng(42)

    def pair(size, colour):
        h, w = size
        mask = np.zeros((h, w), np.uint8)
        top, left = rng.integers(2, h // 2), rng.integers(2, w // 2)
        mask[top : top + h // 3, left : left + w // 4] = 255
        image = rng.integers(0, 200, size=(h, w, 3) if colour else (h, w), dtype=np.uint8)
        image[mask > 0] = 250
        return image, mask

    for site, suffix, n in (("siteA", ".png", 10), ("siteB", ".jpg", 6)):
        (root / site / "images").mkdir(parents=True)
        (root / site / "masks").mkdir()
        for i in range(n):
            image, mask = pair((24, 20), colour=True)
            Image.fromarray(image).save(root / site / "images" / f"case {i}{suffix}")
            Image.fromarray(mask).save(root / site / "masks" / f"case {i}{suffix}")
    for given, n in (("train", 3), ("test", 2)):
        (root / "siteC" / given / "image").mkdir(parents=True)
        (root / "siteC" / given / "mask").mkdir()
        for i in range(n):
            image, mask = pair((16, 18), colour=False)
            Image.fromarray(image).save(root / "siteC" / given / "image" / f"{i:02d}.png")
            Image.fromarray(mask).save(root / "siteC" / given / "mask" / f"{i:02d}.png")
    (root / "notes").mkdir()  # not a site: no image folder


@pytest.fixture
def pictures(tmp_path):
    make_picture_dataset(tmp_path / "src")
    return tmp_path / "src"


def test_convert_picture_folders(pictures, tmp_path):
    out = tmp_path / "out"
    summary = convert_folder_dataset(pictures, out)
    assert json.loads((out / "dataset.json").read_text()) == summary
    assert (summary["spatial_dims"], summary["in_channels"], summary["num_classes"]) == (2, 3, 2)
    sites = {s["site"]: s for s in summary["sites"]}
    assert list(sites) == ["siteA", "siteB", "siteC"]
    assert sites["siteA"]["counts"] == {"training": 7, "validation": 1, "testing": 2}
    assert sites["siteB"]["counts"] == {"training": 4, "validation": 1, "testing": 1}
    assert sites["siteC"]["layout"] == "train/test"
    assert sites["siteC"]["counts"] == {"training": 3, "validation": 0, "testing": 2}
    for site, info in sites.items():
        report = validate_site_data(str(out / info["datalist"]), site)
        assert report["in_channels"] == 3 and report["num_classes"] == 2
        datalist = load_datalist(str(out / info["datalist"]), site)
        for entry in all_cases(datalist):
            channels = [read(p) for p in entry["image"]]
            label, label_affine = read(entry["label"])
            assert len(channels) == 3 and label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
            assert all(c.shape == label.shape == ((16, 18) if site == "siteC" else (24, 20)) for c, _ in channels)
            assert np.array_equal(label_affine, np.eye(4)) and all(np.array_equal(a, np.eye(4)) for _, a in channels)
    # Arrays are the pictures' rows x columns, and PNG masks binarise exactly.
    entry = load_datalist(str(out / "siteA" / "datalist.json"))["training"][0]
    name = Path(entry["label"]).name[: -len(".nii.gz")].replace("_", " ")
    source = np.asarray(Image.open(pictures / "siteA" / "images" / f"{name}.png"))
    assert np.array_equal(read(entry["image"][1])[0], source[..., 1])
    mask = np.asarray(Image.open(pictures / "siteA" / "masks" / f"{name}.png"))
    assert np.array_equal(read(entry["label"])[0], (mask > 127).astype(np.uint8))
    # JPEG masks have grey edges, still binary after thresholding; their foreground is the drawn box.
    assert 0.05 < sites["siteB"]["foreground_fraction"] < 0.3


def test_convert_is_deterministic_and_seeded(pictures, tmp_path):
    def layout(out):
        return {site: (out / site / "datalist.json").read_text() for site in ("siteA", "siteB", "siteC")}

    convert_folder_dataset(pictures, tmp_path / "a", seed=0)
    convert_folder_dataset(pictures, tmp_path / "b", seed=0)
    convert_folder_dataset(pictures, tmp_path / "c", seed=1)
    assert layout(tmp_path / "a") == layout(tmp_path / "b")
    assert layout(tmp_path / "a")["siteA"] != layout(tmp_path / "c")["siteA"]
    for p in sorted((tmp_path / "a" / "siteA" / "imagesTr").iterdir()):
        assert p.read_bytes() == (tmp_path / "b" / "siteA" / "imagesTr" / p.name).read_bytes()


def test_convert_grayscale_label_map_and_max_cases(pictures, tmp_path):
    summary = convert_folder_dataset(
        pictures, tmp_path / "g", sites=["siteA"], grayscale=True, label_map={"255": 2}, max_cases=5, split=(0.6, 0.2, 0.2)
    )
    assert summary["in_channels"] == 1 and summary["num_classes"] == 3
    assert summary["sites"][0]["counts"] == {"training": 3, "validation": 1, "testing": 1}
    datalist = load_datalist(str(tmp_path / "g" / "siteA" / "datalist.json"))
    assert datalist["labels"] == {"0": "background", "1": "class-1", "2": "class-2"}
    entry = datalist["training"][0]
    assert isinstance(entry["image"], str) and read(entry["image"])[0].shape == (24, 20)
    assert set(np.unique(read(entry["label"])[0])) == {0, 2}
    validate_site_data(str(tmp_path / "g" / "siteA" / "datalist.json"), "siteA")


def test_convert_missing_mask_fails_and_leaves_nothing(pictures, tmp_path):
    (pictures / "siteB" / "masks" / "case 3.jpg").unlink()
    with pytest.raises(DataValidationError) as caught:
        convert_folder_dataset(pictures, tmp_path / "out")
    assert caught.value.site == "siteB"
    assert caught.value.file == str(pictures / "siteB" / "images" / "case 3.jpg")
    assert "no mask named case 3" in caught.value.problem
    assert no_leftovers(tmp_path, "out")


def test_convert_failure_mid_write_leaves_nothing(pictures, tmp_path):
    # A truncated picture: its header reads, its pixels do not, so the failure comes after
    # siteA and siteB were already written.
    victim = pictures / "siteC" / "test" / "image" / "01.png"
    victim.write_bytes(victim.read_bytes()[:60])
    with pytest.raises(DataValidationError) as caught:
        convert_folder_dataset(pictures, tmp_path / "out")
    assert (caught.value.site, caught.value.file) == ("siteC", str(victim))
    assert "cannot read image" in caught.value.problem
    assert no_leftovers(tmp_path, "out")


def test_convert_rejects_mismatched_mask_size_and_empty_threshold(pictures, tmp_path):
    mask = pictures / "siteA" / "masks" / "case 2.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
    with pytest.raises(DataValidationError, match=r"mask size \(10, 10\) differs from image size \(24, 20\)"):
        convert_folder_dataset(pictures, tmp_path / "out", sites=["siteA"])
    # A 0/1 PNG mask with the default threshold 127 would silently become empty: refuse.
    Image.fromarray(np.eye(24, 20, dtype=np.uint8)).save(mask)
    with pytest.raises(DataValidationError, match="all at or below the threshold 127"):
        convert_folder_dataset(pictures, tmp_path / "out", sites=["siteA"])
    assert no_leftovers(tmp_path, "out")


POLYP_CENTRES = ["CVC-ClinicDB", "CVC-ColonDB", "Kvasir-SEG"]
needs_polyp = pytest.mark.skipif(not (SHARED_DATA / "polyp").is_dir(), reason="../shared/data/polyp not available")


@pytest.mark.slow
@needs_polyp
def test_convert_real_polyp_sites(tmp_path):
    result = run_module("fedseg.data.convert", "--src", SHARED_DATA / "polyp", "--out", tmp_path / "polyp", "--max-cases", 8)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "polyp" / "dataset.json").read_text())
    assert [s["site"] for s in summary["sites"]] == POLYP_CENTRES
    assert (summary["in_channels"], summary["num_classes"]) == (3, 2)
    for s in summary["sites"]:
        # Video centres are split by whole sequences (the counts follow the groups); Kvasir-SEG by image.
        assert sum(s["counts"].values()) == 8 and s["counts"]["training"] >= 4 and s["counts"]["testing"] >= 1
        assert s["split_unit"] == ("case" if s["site"] == "Kvasir-SEG" else "video_sequence")
        assert 0.01 < s["foreground_fraction"] < 0.5 and not s["warnings"]
        report = validate_site_data(str(tmp_path / "polyp" / s["datalist"]), s["site"])
        assert report["label_fractions"]["1"] == pytest.approx(s["foreground_fraction"], abs=1e-4)
        shapes = (report["shape_min"], report["shape_max"])
        assert shapes == ([500, 574], [500, 574]) if s["site"] == "CVC-ColonDB" else shapes == ([256, 256], [256, 256])
    again = convert_folder_dataset(SHARED_DATA / "polyp", tmp_path / "again", max_cases=8)
    assert again["sites"] == summary["sites"]
    for site in POLYP_CENTRES:
        assert (tmp_path / "polyp" / site / "datalist.json").read_text() == (
            tmp_path / "again" / site / "datalist.json"
        ).read_text()


def sequence_of(site: str) -> dict[str, str]:
    rows = (SHARED_DATA / "polyp" / site / "sequence.csv").read_text().split()[1:]
    return dict(row.split(",") for row in rows)


def stem_of(entry: dict) -> str:
    return Path(image_paths(entry)[0]).name.split("_0000")[0].removesuffix(".nii.gz")


@pytest.mark.slow
@needs_polyp
def test_video_centres_are_split_by_sequence_with_no_sequence_in_two_sections(tmp_path):
    sites = ["CVC-ClinicDB", "CVC-ColonDB"]
    # 150 frames per centre (a seeded subset) keep the test short; the split is still by whole sequences
    summary = convert_folder_dataset(SHARED_DATA / "polyp", tmp_path / "seq", sites=sites, seed=3, max_cases=150)
    for s in summary["sites"]:
        truth = sequence_of(s["site"])
        datalist = json.loads((tmp_path / "seq" / s["datalist"]).read_text())
        assert datalist["split_unit"] == "video_sequence" and s["group_file"].endswith("sequence.csv")
        sections = {sec: {truth[stem_of(e)] for e in datalist[sec]} for sec in SECTIONS}
        for e in all_cases(datalist):  # every case records its group, as the centre's own file says
            assert e["group"] == truth[stem_of(e)]
        assert not sections["training"] & sections["testing"]
        assert not sections["training"] & sections["validation"] and not sections["validation"] & sections["testing"]
        assert sum(s["counts"].values()) == 150
        assert 0.1 < s["counts"]["testing"] / 150 < 0.35, s["counts"]  # whole sequences, near the 20 %
        assert s["groups"] == {sec: len(sections[sec]) for sec in SECTIONS}
        validate_site_data(str(tmp_path / "seq" / s["datalist"]), s["site"], check_files=False)
    # Deterministic per seed; another seed draws other sequences.
    same = convert_folder_dataset(SHARED_DATA / "polyp", tmp_path / "same", sites=sites, seed=3, max_cases=150)
    convert_folder_dataset(SHARED_DATA / "polyp", tmp_path / "other", sites=sites, seed=4, max_cases=150)
    assert same["sites"] == summary["sites"]
    for site in sites:
        assert (tmp_path / "same" / site / "datalist.json").read_text() == (
            tmp_path / "seq" / site / "datalist.json"
        ).read_text()
    tests = [
        json.loads((tmp_path / d / site / "datalist.json").read_text())["testing"] for d in ("seq", "other") for site in sites
    ]
    assert [sorted(e["group"] for e in t) for t in tests[:2]] != [sorted(e["group"] for e in t) for t in tests[2:]]


@pytest.mark.slow
@needs_polyp
def test_frame_split_is_only_on_request_and_reports_its_leakage(tmp_path):
    # a seeded subset of 150 of the centre's 612 frames: still more frames than sequences, so the leak shows
    summary = convert_folder_dataset(
        SHARED_DATA / "polyp", tmp_path / "frames", sites=["CVC-ClinicDB"], split_by="case", max_cases=150
    )
    site = summary["sites"][0]
    assert site["split_unit"] == "case" and site["groups"] is None
    assert "share a video_sequence with training cases" in site["warnings"][0]
    datalist = json.loads((tmp_path / "frames" / site["datalist"]).read_text())
    truth = sequence_of("CVC-ClinicDB")
    trained = {truth[stem_of(e)] for e in datalist["training"]}
    leaked = sum(truth[stem_of(e)] in trained for e in datalist["testing"])
    assert f"{leaked} of {site['counts']['testing']} test cases" in site["warnings"][0] and leaked > 0
    assert not any("group" in e for e in all_cases(datalist))


def test_group_split_on_picture_folders_and_refused_inputs(pictures, tmp_path):
    (pictures / "siteA" / "groups.csv").write_text("stem,patient\n" + "".join(f"case {i},p{i // 2}\n" for i in range(10)))
    summary = convert_folder_dataset(pictures, tmp_path / "out", sites=["siteA"], split=(0.5, 0.2, 0.3))
    s = summary["sites"][0]
    assert s["split_unit"] == "patient" and s["groups"]["testing"] >= 1
    datalist = json.loads((tmp_path / "out" / "siteA" / "datalist.json").read_text())
    by_section = {sec: {e["group"] for e in datalist[sec]} for sec in SECTIONS}
    assert not by_section["training"] & (by_section["validation"] | by_section["testing"])
    # A case the group file does not list, and a case listed in two groups, are refused by name.
    (pictures / "siteA" / "groups.csv").write_text("stem,patient\ncase 0,p0\n")
    with pytest.raises(DataValidationError, match=r"9 case\(s\) have no group") as caught:
        convert_folder_dataset(pictures, tmp_path / "bad", sites=["siteA"])
    assert caught.value.site == "siteA" and caught.value.file.endswith("groups.csv")
    (pictures / "siteA" / "groups.csv").write_text("stem,patient\ncase 0,p0\ncase 0,p1\n")
    with pytest.raises(DataValidationError, match="is in group 'p0' and in group 'p1'"):
        convert_folder_dataset(pictures, tmp_path / "bad", sites=["siteA"])
    (pictures / "siteA" / "groups.csv").write_text("stem,colour\ncase 0,red\n")
    with pytest.raises(DataValidationError, match="no group column"):
        convert_folder_dataset(pictures, tmp_path / "bad", sites=["siteA"])
    assert no_leftovers(tmp_path, "bad")


def test_validator_refuses_a_group_in_training_and_testing(site_copy):
    path, _ = site_copy

    def regroup(dl):
        for sec in SECTIONS:
            for i, e in enumerate(dl.get(sec, [])):
                e["group"] = f"{sec}-{i}"
        dl["testing"][0]["group"] = dl["training"][1]["group"]
        dl["validation"][0]["group"] = dl["training"][0]["group"]

    edit_datalist(path, regroup)
    with pytest.raises(DataValidationError, match=r"1 group\(s\) have cases in training and in testing") as caught:
        validate_site_data(str(path), "site-1", check_files=False)
    assert caught.value.site == "site-1" and caught.value.file == str(path)

    def only_validation_shared(dl):
        dl["testing"][0]["group"] = "testing-0"

    edit_datalist(path, only_validation_shared)
    report = validate_site_data(str(path), "site-1", check_files=False)
    assert any("in training and in validation" in w for w in report["warnings"])


@pytest.mark.skipif(not (SHARED_DATA / "prostate-slices").is_dir(), reason="../shared/data/prostate-slices not available")
def test_convert_real_prostate_slices(tmp_path):
    # These masks mark the prostate with 0 and the background with 255.
    summary = convert_folder_dataset(SHARED_DATA / "prostate-slices", tmp_path / "prostate", label_map={"0": 1})
    sites = {s["site"]: s for s in summary["sites"]}
    assert sorted(sites) == ["BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL"]
    assert summary["in_channels"] == 1 and summary["num_classes"] == 2
    assert sites["I2CVB"]["pairing"] == "train: order, test: stem"  # its one training pair has different names
    means = []
    for site, s in sites.items():
        assert s["layout"] == "train/test"
        assert s["counts"] == {"training": 1, "validation": 0, "testing": 1}
        assert 0.002 < s["foreground_fraction"] < 0.05 and not s["warnings"]
        report = validate_site_data(str(tmp_path / "prostate" / s["datalist"]), site)
        assert report["shape_min"] == [384, 384]
        means.append(report["intensity"]["mean"])
    assert max(means) > 3 * min(means), "the six real sites' intensity ranges differ a lot"
    inverted = convert_folder_dataset(SHARED_DATA / "prostate-slices", tmp_path / "raw", sites=["HK"])
    assert inverted["sites"][0]["warnings"] and "inverted" in inverted["sites"][0]["warnings"][0]
