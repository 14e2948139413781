"""`fedseg export`: any trained FedSeg model as a MONAI bundle (see fedseg.export.bundle)."""

from fedseg.export.bundle import export_bundle, main
from fedseg.export.modelsets import ExportError

__all__ = ["ExportError", "export_bundle", "main"]
