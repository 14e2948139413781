"""The server's model persistor for FedSeg jobs.

NVFlare's PTFileModelPersistor, building the network from the job's plain network arguments, so a job
config states the network once as JSON and the server only needs this class on its class allow-list.

A job chooses its arguments, so it may not use them to touch the server's own files: model files are plain
names written inside the job's app dir (also when the job's config/environment.json sets APP_CKPT_DIR or
APP_CKPT, which NVFlare would resolve anywhere), and checkpoints are always loaded with torch's weights-only
unpickler (a job-shipped pickle never runs code on the server).
"""

from __future__ import annotations

import os

import torch
from nvflare.apis.fl_constant import FLContextKey, WorkspaceConstants
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import DefaultCheckpointFileName
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from fedseg.engine.networks import SegNetwork
from fedseg.fl.base_controller import SERVER_CONFIG_RELPATH, confine_path, operator_resume_dirs


class SegModelPersistor(PTFileModelPersistor):
    def __init__(
        self,
        network: dict,
        source_ckpt_file_full_name: str | None = None,
        seed: int = 0,
        global_model_file_name: str = DefaultCheckpointFileName.GLOBAL_MODEL,
        best_global_model_file_name: str = DefaultCheckpointFileName.BEST_GLOBAL_MODEL,
        load_weights_only: bool = True,
        **kwargs,
    ):
        """
        Args:
            network: SegNetwork arguments (arch, spatial_dims, in_channels, out_channels, channels, ...).
            seed: seeds the initial weights, so a job starts from the same network every time it runs.
            source_ckpt_file_full_name: path on the server of a checkpoint to start from (resume): inside the job's
                run dir or a directory the server's local/fedseg_server.json lists under "resume_dirs"; anything
                else stops the job before a weight is loaded.
            global_model_file_name / best_global_model_file_name: plain file names (they are written into the
                job's app dir: a path could overwrite the server's own files).
            load_weights_only: must stay true (checkpoints are loaded with torch's weights-only unpickler).
            kwargs: any other PTFileModelPersistor argument.
        """
        for key, name in (
            ("global_model_file_name", global_model_file_name),
            ("best_global_model_file_name", best_global_model_file_name),
        ):
            if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name:
                raise ValueError(f"{key} must be a plain file name (written in the job's app dir), got {name!r}")
        if load_weights_only is not True:
            raise ValueError("load_weights_only must stay true: a checkpoint is never unpickled with code on the server")
        with torch.random.fork_rng():  # do not disturb the server process's global RNG
            torch.manual_seed(int(seed))
            model = SegNetwork(**network)
        super().__init__(
            model=model,
            source_ckpt_file_full_name=source_ckpt_file_full_name,
            global_model_file_name=global_model_file_name,
            best_global_model_file_name=best_global_model_file_name,
            load_weights_only=load_weights_only,
            **kwargs,
        )
        # the arguments as given (NVFlare's FedJob export writes the attributes back as the job's arguments)
        self.network = network
        self.seed = seed

    def _initialize(self, fl_ctx: FLContext):
        super()._initialize(fl_ctx)
        app_root = os.path.realpath(fl_ctx.get_prop(FLContextKey.APP_ROOT))
        if self.source_ckpt_file_full_name:
            self._confine_source_checkpoint(app_root, fl_ctx)
        paths = {
            "model file": self._ckpt_save_path,
            "best model file": self._best_ckpt_save_path,
            "APP_CKPT": self.ckpt_preload_path,
        }
        outside = {k: v for k, v in paths.items() if v and os.path.commonpath([app_root, os.path.realpath(v)]) != app_root}
        if outside:
            # neutralise first (nothing may be written there even if the panic is not acted upon at once), then stop
            self.log_dir = app_root
            self._ckpt_save_path = os.path.join(app_root, self.global_model_file_name)
            self._best_ckpt_save_path = os.path.join(app_root, self.best_global_model_file_name)
            self.ckpt_preload_path = None
            self.system_panic(
                f"SegModelPersistor: {outside} lie outside the job's app dir {app_root} (set by the "
                "job's config/environment.json APP_CKPT_DIR/APP_CKPT?): refused",
                fl_ctx,
            )

    def _confine_source_checkpoint(self, app_root: str, fl_ctx: FLContext) -> None:
        """The checkpoint to start from must lie in this job's run dir or in a directory the server operator lists
        under "resume_dirs" in <server workspace>/local/fedseg_server.json (as for the workflows' resume_from):
        another job's model is not this job's to load and send to the sites. Refused: nothing is loaded."""
        value = self.source_ckpt_file_full_name
        workspace = fl_ctx.get_engine().get_workspace()
        # NVFlare resolves a relative name against the app's custom folder
        base = os.path.join(app_root, WorkspaceConstants.CUSTOM_FOLDER_NAME)
        try:
            if not isinstance(value, str):
                raise ValueError(f"must be a path, got {type(value).__name__}")
            roots = [workspace.get_run_dir(fl_ctx.get_job_id()), *operator_resume_dirs(workspace.get_root_dir())]
            self.source_ckpt_file_full_name = str(confine_path(value, base, roots))
        except (PermissionError, ValueError) as e:
            self.source_ckpt_file_full_name = None  # neutralise first: nothing may be loaded from there
            self.system_panic(
                f"SegModelPersistor: source_ckpt_file_full_name {value!r} refused: a job starts only from a "
                f"checkpoint inside its own folder or a directory the server operator lists under "
                f'"resume_dirs" in <server workspace>/{SERVER_CONFIG_RELPATH} ({e})',
                fl_ctx,
            )
