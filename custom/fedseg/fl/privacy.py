"""A site-enforced privacy filter for FedSeg model updates (used from a hospital's local/privacy.json).

NVFlare runs the task-result filters of a site's privacy scope on everything the site sends back, after
the job's own filters, and a job cannot switch them off. LayerPrivacyFilter changes the model weights
that leave the site:

  zero_vars   regular expressions (re.search on the parameter name): these tensors are sent as zeros,
              so their trained values never leave the site. The keys stay, so FedAvg on FULL weights
              keeps working; with FULL weights the zeros are averaged into the global model, with DIFF
              updates (WEIGHT_DIFF) a zero means "no change" for that tensor.
  noise_vars  regular expressions: these tensors (except the zeroed ones) get Gaussian noise with a
              standard deviation of noise_std times the tensor's own standard deviation.

Optimizer state that travels with FedSM's selector and FedCross's models (keys "<param>::<state>") is never
touched: it is not model weights, and noise would make Adam's second moments negative. FedSM and FedCross
pack several models into one update ("global/<param>", "model/<param>"): write patterns that allow the
prefix, e.g. "(^|/)net\\.model\\.2\\.1\\.". Metrics (validation results) pass unchanged. Every application is logged at the site, e.g.
    privacy filter at hospital-a, task train: zeroed 2 tensor(s) [...]; perturbed 35 tensor(s) (noise 0.01 x std)
and NVFlare records the filter in the DXO's filter history, which the server keeps with the update.

Example scope (see poc/privacy.json):
    {"name": "hospital_private",
     "task_result_filters": [{"path": "fedseg.fl.privacy.LayerPrivacyFilter",
                              "args": {"zero_vars": ["^net\\\\.model\\\\.2\\\\.1\\\\."], "noise_vars": [".*"], "noise_std": 0.01}}]}
"""

from __future__ import annotations

import re

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable


def _compile(patterns, arg: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise TypeError(f"{arg} must be a list of regular expressions, got {type(patterns).__name__}")
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{arg} entries must be strings, got {p!r}")
        compiled.append(re.compile(p))
    return compiled


class LayerPrivacyFilter(DXOFilter):
    def __init__(
        self,
        zero_vars: list[str] | None = None,
        noise_vars: list[str] | None = None,
        noise_std: float = 0.0,
        seed: int | None = None,
        data_kinds: list[str] | None = None,
    ):
        """
        Args:
            zero_vars: regular expressions of parameter names sent as zeros.
            noise_vars: regular expressions of parameter names that get Gaussian noise.
            noise_std: noise standard deviation relative to each tensor's standard deviation (0: no noise).
            seed: seed of the noise generator (None: fresh randomness every time).
            data_kinds: DXO kinds to filter; default WEIGHTS and WEIGHT_DIFF.
        """
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=data_kinds or kinds)
        self.zero_vars = _compile(zero_vars, "zero_vars")
        self.noise_vars = _compile(noise_vars, "noise_vars")
        if not isinstance(noise_std, (int, float)) or noise_std < 0:
            raise ValueError(f"noise_std must be a number >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def _matches(name: str, patterns: list[re.Pattern]) -> bool:
        return any(p.search(name) for p in patterns)

    def filter_params(self, params: dict) -> tuple[dict, list[str], list[str]]:
        """Return (new params, zeroed names, perturbed names); params is not modified."""
        out, zeroed, perturbed = dict(params), [], []
        for name, value in params.items():
            if "::" in name:  # optimizer state (see module docstring)
                continue
            if self._matches(name, self.zero_vars):
                out[name] = value * 0  # same type, dtype and shape (numpy array or torch tensor)
                zeroed.append(name)
            elif self.noise_std > 0 and self._matches(name, self.noise_vars):
                array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
                if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
                    continue
                scale = self.noise_std * float(array.std() or 1.0)
                noisy = (array + self.rng.normal(0.0, scale, size=array.shape)).astype(array.dtype)
                if hasattr(value, "detach"):
                    import torch

                    noisy = torch.as_tensor(noisy, dtype=value.dtype, device=value.device)
                out[name] = noisy
                perturbed.append(name)
        return out, zeroed, perturbed

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if not isinstance(dxo.data, dict) or not dxo.data:
            return None
        params, zeroed, perturbed = self.filter_params(dxo.data)
        site = fl_ctx.get_identity_name()
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME, "?")
        self.log_info(
            fl_ctx,
            f"privacy filter at {site}, task {task}: zeroed {len(zeroed)} tensor(s) {zeroed}; "
            f"perturbed {len(perturbed)} tensor(s) (noise {self.noise_std} x std)",
        )
        if not zeroed and not perturbed:
            return None
        dxo.data = params
        return dxo
