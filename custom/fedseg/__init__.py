"""FedSeg: federated medical image segmentation on NVIDIA FLARE and MONAI.

Sub-packages:
  fedseg.data        datalists, validation, built-in synthetic generator, converter (no FLARE)
  fedseg.engine      MONAI training/evaluation engine (no FLARE)
  fedseg.algorithms  pure math of the server workflows: aggregation, SoftPull, schedules, routing (no FLARE)
  fedseg.fl          thin FLARE glue: site executor, controllers, persistence
"""

__version__ = "0.1.0"
