"""The server's model persistor for FedSeg jobs.

NVFlare's PTFileModelPersistor, building the network from the job's plain network arguments, so a job
config states the network once as JSON and sites only need the "fedseg." prefix on their class allow-list.
"""

from __future__ import annotations

import torch
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from fedseg.engine.networks import SegNetwork


class SegModelPersistor(PTFileModelPersistor):
    def __init__(self, network: dict, source_ckpt_file_full_name: str | None = None, seed: int = 0, **kwargs):
        """
        Args:
            network: SegNetwork arguments (arch, spatial_dims, in_channels, out_channels, channels, ...).
            seed: seeds the initial weights, so a job starts from the same network every time it runs.
            source_ckpt_file_full_name: absolute path on the server of a checkpoint to start from (resume).
            kwargs: any other PTFileModelPersistor argument.
        """
        with torch.random.fork_rng():  # do not disturb the server process's global RNG
            torch.manual_seed(int(seed))
            model = SegNetwork(**network)
        super().__init__(model=model, source_ckpt_file_full_name=source_ckpt_file_full_name, **kwargs)
