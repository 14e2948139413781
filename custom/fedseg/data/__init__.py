"""fedseg.data: datalists, data validation, the built-in synthetic dataset and a converter (no FLARE).

On-disk convention (what MONAI's LoadImaged(image_only=True) + EnsureChannelFirstd read as
(K, *spatial) with no extra options): images and labels are NIfTI; a single-channel image is one
file of shape (H, W) or (H, W, D); a K-channel image is a list of K such files in the datalist
("image": [c0, c1, ...]); a label is one integer class map of the image's spatial shape.
"""

from .datalist import SECTIONS, image_paths, load_datalist, resolve_site_datalist, write_json
from .errors import DataValidationError
from .validate import validate_site_data

__all__ = [
    "DataValidationError",
    "SECTIONS",
    "convert_folder_dataset",
    "generate_dataset",
    "image_paths",
    "load_datalist",
    "resolve_site_datalist",
    "validate_site_data",
    "write_json",
]


def __getattr__(name):
    # Imported on first use so that `python -m fedseg.data.synthetic` / `.convert` do not find
    # their own module already imported by the package (runpy warns about that).
    if name == "generate_dataset":
        from .synthetic import generate_dataset

        return generate_dataset
    if name == "convert_folder_dataset":
        from .convert import convert_folder_dataset

        return convert_folder_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
