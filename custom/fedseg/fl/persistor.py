"""The server's model persistor for FedSeg jobs.

NVFlare's PTFileModelPersistor, building the network from the job's plain network arguments, so a job
config states the network once as JSON and sites only need the "fedseg." prefix on their class allow-list.
"""

from __future__ import annotations

from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from fedseg.engine.networks import SegNetwork


class SegModelPersistor(PTFileModelPersistor):
    def __init__(self, network: dict, source_ckpt_file_full_name: str | None = None, **kwargs):
        """
        Args:
            network: SegNetwork arguments (arch, spatial_dims, in_channels, out_channels, channels, ...).
            source_ckpt_file_full_name: absolute path on the server of a checkpoint to start from (resume).
            kwargs: any other PTFileModelPersistor argument.
        """
        super().__init__(model=SegNetwork(**network), source_ckpt_file_full_name=source_ckpt_file_full_name, **kwargs)
