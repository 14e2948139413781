"""What a FedSeg site lets leave it: a site-enforced privacy filter (used from a hospital's local/privacy.json)
and the rule on which data sections a site scores for the server.

NVFlare runs the task-result filters of a site's privacy scope on everything the site sends back, before
the job's own result filters, and a job cannot switch them off. LayerPrivacyFilter decides, per reply:

Model weights (WEIGHTS / WEIGHT_DIFF DXOs; FedSM and FedCross pack several models into one update with
"<group>/" prefixes, e.g. "global/net...", "model/net...", see fedseg.algorithms.packing):
  zero_vars   regular expressions (re.search on the key): these tensors are sent as zeros, so their trained
              values never leave the site. The keys stay, so FedAvg on FULL weights keeps working; with FULL
              weights the zeros are averaged into the global model, with DIFF updates a zero means "no change".
              Write patterns that allow the group prefix, e.g. "(^|/)net\\.model\\.2\\.1\\.".
  noise_vars  regular expressions: these tensors (except the zeroed ones) get Gaussian noise with a standard
              deviation of noise_std times the tensor's own standard deviation. This only obfuscates: it is
              NOT differential privacy (no clipping, no privacy budget / epsilon).

Optimizer state (FedSM's selector, "selector_optim/<param>::<state>", and FedCross's travelling models,
"optim/<param>::<state>"; <state> is e.g. step, exp_avg, exp_avg_sq):
  optimizer_state not given (default): "send" when the filter neither zeroes nor perturbs any weight, else
              "drop" (with a warning in the site's log): the moments are running averages of the site's
              gradients (FedSM's selector moment divided by the learning rate IS its full-batch gradient), which
              the noise does not cover. A scope that wants them sent anyway says so with "send".
  optimizer_state="send": it is sent (a warning is logged when the weights are zeroed or perturbed). Noise is
              never added to it (noise would make Adam's second moments negative). The moments of a zeroed parameter are zeroed with it, so the moments of a layer
              that must not leave do not leave either: a state key is zeroed when a zero_vars pattern matches
              its "<group>/<param>" part or its bare "<param>". Step counts ("::step") are kept: they say how
              many steps ran, not what the data is, and the server refuses a step count that goes back.
  optimizer_state="drop": every "::" key is removed, so the groups "optim" / "selector_optim" are absent from
              the reply; the server then continues with a fresh optimizer state.
  The moments are running averages of the site's gradients: a scope that perturbs the weights drops the
  optimizer state unless it explicitly allows it.
  FedSM's "lda" selector statistics ("selector_stats/count", "/mean", "/scatter": sums over the site's training
  images' selector features) follow the same rule and are never perturbed (noise would make the scatter
  asymmetric, which the server refuses). Dropped, they leave the selector unable to route to this site (the
  server logs it, and a selector that routes no better than chance is reported as collapsed).

Metrics (METRICS DXOs, e.g. validate / cross_validate / fedsm_evaluate results, and the metrics in the meta
of weight DXOs, e.g. "initial_metrics"), searched recursively through nested dicts and lists:
  share_per_case=False (default): every key ending in "_per_case" (dice_per_case, mean_std_per_case, ...)
              is removed; only summaries (mean, std, counts) leave the site.
  share_case_names=False (default): every "case_names" key is removed.

Every application is logged at the site, e.g.
    privacy filter at hospital-a, task train: zeroed 2 tensor(s) [...]; perturbed 35 tensor(s) (noise 0.01 x std)
    privacy filter at hospital-a, task cross_validate: removed per-case results ['ensemble.dice_per_case', ...]
and NVFlare records the filter in the DXO's filter history, which the server keeps with the update.
Without a privacy scope (or this filter in a job) nothing is removed: the simulator benchmarks keep per-case
results.

Sections: a site scores only its "validation" and "testing" cases for the server (check_scorable_section);
the server cannot ask for scores on the training cases.

Example scope (see poc/privacy.json):
    {"name": "hospital_private",
     "task_result_filters": [{"path": "fedseg.fl.privacy.LayerPrivacyFilter",
                              "args": {"zero_vars": ["(^|/)net\\\\.model\\\\.2\\\\.1\\\\."], "noise_vars": [".*"],
                                       "noise_std": 0.01, "optimizer_state": "drop"}}]}
"""

from __future__ import annotations

import re

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

OPTIM_SEP = "::"  # "<param>::<state key>", see fedseg.engine.optimizer_state_to_numpy
GROUP_SEP = "/"  # "<group>/<key>", see fedseg.algorithms.packing
STATS_GROUP = "selector_stats"  # FedSM's "lda" selector: count, mean and scatter of the site's image features
OPTIMIZER_STATE_MODES = ("send", "drop")
PER_CASE_SUFFIX = "_per_case"
CASE_NAMES_KEY = "case_names"
SCORABLE_SECTIONS = ("validation", "testing")


class SectionRefused(ValueError):
    """The server asked a site to score a datalist section that a site never scores for the server."""


def check_scorable_section(site: str, section) -> str:
    """Return section if a site may score it for the server, else raise SectionRefused naming site and section."""
    if section not in SCORABLE_SECTIONS:
        raise SectionRefused(
            f"site {site} refuses to score its {section!r} section for the server (task meta 'section'): "
            f"only {' and '.join(repr(s) for s in SCORABLE_SECTIONS)} are scored"
        )
    return section


def is_optimizer_state(key: str) -> bool:
    """Optimizer state, and FedSM's selector feature statistics ("selector_stats/..."): running averages and sums
    over the site's own data that weight noise does not cover, so one rule (optimizer_state) says whether they go."""
    return OPTIM_SEP in key or key.startswith(STATS_GROUP + GROUP_SEP)


def strip_metrics(metrics, share_per_case: bool, share_case_names: bool, path: str = "") -> tuple[object, list[str], list[str]]:
    """Return (copy of metrics without the removed keys, removed per-case paths, removed case-name paths).

    Walks nested dicts and lists; paths read like "members[0].dice_per_case"."""
    per_case: list[str] = []
    names: list[str] = []
    if isinstance(metrics, dict):
        out = {}
        for key, value in metrics.items():
            where = f"{path}.{key}" if path else str(key)
            if not share_per_case and isinstance(key, str) and key.endswith(PER_CASE_SUFFIX):
                per_case.append(where)
                continue
            if not share_case_names and key == CASE_NAMES_KEY:
                names.append(where)
                continue
            out[key], p, n = strip_metrics(value, share_per_case, share_case_names, where)
            per_case += p
            names += n
        return out, per_case, names
    if isinstance(metrics, (list, tuple)):
        out_list = []
        for i, value in enumerate(metrics):
            item, p, n = strip_metrics(value, share_per_case, share_case_names, f"{path}[{i}]")
            out_list.append(item)
            per_case += p
            names += n
        return type(metrics)(out_list), per_case, names
    return metrics, per_case, names


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
        optimizer_state: str | None = None,
        share_per_case: bool = False,
        share_case_names: bool = False,
        data_kinds: list[str] | None = None,
    ):
        """
        Args:
            zero_vars: regular expressions of parameter names sent as zeros (with their optimizer moments).
            noise_vars: regular expressions of parameter names that get Gaussian noise (never optimizer state).
            noise_std: noise standard deviation relative to each tensor's standard deviation (0: no noise).
            seed: seed of the noise generator (None: fresh randomness every time).
            optimizer_state: "send" or "drop" the optimizer state ("<param>::<state>" keys); None (default): "drop"
                when zero_vars or noise is configured, else "send".
            share_per_case: let per-case metric lists ("*_per_case") leave the site.
            share_case_names: let case file names ("case_names") leave the site.
            data_kinds: DXO kinds to filter; default WEIGHTS, WEIGHT_DIFF and METRICS.
        """
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF, DataKind.METRICS]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=data_kinds or kinds)
        # every argument is kept as given (NVFlare's FedJob export writes the attributes back as the arguments);
        # the compiled patterns and the noise generator live under other names
        self._zero_res = _compile(zero_vars, "zero_vars")
        self._noise_res = _compile(noise_vars, "noise_vars")
        self.zero_vars = list(zero_vars) if zero_vars is not None else None
        self.noise_vars = list(noise_vars) if noise_vars is not None else None
        if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or noise_std < 0:
            raise ValueError(f"noise_std must be a number >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)
        if optimizer_state is not None and optimizer_state not in OPTIMIZER_STATE_MODES:
            raise ValueError(f"optimizer_state must be one of {list(OPTIMIZER_STATE_MODES)}, got {optimizer_state!r}")
        self.optimizer_state = optimizer_state
        # the weights leave the site changed: their optimizer state (the site's gradients) must not leave unless allowed
        self._protects_weights = bool(self._zero_res) or (self.noise_std > 0 and bool(self._noise_res))
        self._optim_mode = optimizer_state or ("drop" if self._protects_weights else "send")
        for arg, value in (("share_per_case", share_per_case), ("share_case_names", share_case_names)):
            if not isinstance(value, bool):
                raise TypeError(f"{arg} must be true or false, got {value!r}")
        self.share_per_case = share_per_case
        self.share_case_names = share_case_names
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    @staticmethod
    def _matches(name: str, patterns: list[re.Pattern]) -> bool:
        return any(p.search(name) for p in patterns)

    def _state_of_zeroed(self, key: str) -> bool:
        param = key.partition(OPTIM_SEP)[0]
        return self._matches(param, self._zero_res) or self._matches(param.rpartition(GROUP_SEP)[2], self._zero_res)

    def filter_params(self, params: dict) -> tuple[dict, dict[str, list[str]]]:
        """Return (new params, {"zeroed", "perturbed", "optim_dropped", "optim_zeroed": key lists});
        params is not modified."""
        out = dict(params)
        done: dict[str, list[str]] = {"zeroed": [], "perturbed": [], "optim_dropped": [], "optim_zeroed": []}
        for name, value in params.items():
            if is_optimizer_state(name):
                if self._optim_mode == "drop":
                    del out[name]
                    done["optim_dropped"].append(name)
                elif OPTIM_SEP in name and name.partition(OPTIM_SEP)[2] != "step" and self._state_of_zeroed(name):
                    out[name] = value * 0
                    done["optim_zeroed"].append(name)
                continue  # never noise: Adam's second moments must stay >= 0
            if self._matches(name, self._zero_res):
                out[name] = value * 0  # same type, dtype and shape (numpy array or torch tensor)
                done["zeroed"].append(name)
            elif self.noise_std > 0 and self._matches(name, self._noise_res):
                array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
                if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
                    continue
                scale = self.noise_std * float(array.std() or 1.0)
                noisy = (array + self._rng.normal(0.0, scale, size=array.shape)).astype(array.dtype)
                if hasattr(value, "detach"):
                    import torch

                    noisy = torch.as_tensor(noisy, dtype=value.dtype, device=value.device)
                out[name] = noisy
                done["perturbed"].append(name)
        return out, done

    def filter_metrics(self, metrics) -> tuple[object, list[str], list[str]]:
        return strip_metrics(metrics, self.share_per_case, self.share_case_names)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        parts, changed = [], False
        if dxo.data_kind in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF) and isinstance(dxo.data, dict):
            params, done = self.filter_params(dxo.data)
            parts.append(f"zeroed {len(done['zeroed'])} tensor(s) {done['zeroed']}")
            parts.append(f"perturbed {len(done['perturbed'])} tensor(s) (noise {self.noise_std} x std)")
            if done["optim_dropped"]:
                parts.append(f"dropped optimizer state ({len(done['optim_dropped'])} key(s))")
                if self.optimizer_state is None:
                    self.log_warning(
                        fl_ctx,
                        f"privacy filter at {fl_ctx.get_identity_name()}: optimizer state dropped "
                        f"({len(done['optim_dropped'])} key(s)) because this privacy scope zeroes or perturbs weights "
                        'and does not allow it ("optimizer_state": "send"); the server continues with a fresh one',
                    )
            elif self.optimizer_state == "send" and self._protects_weights and any(is_optimizer_state(k) for k in params):
                self.log_warning(
                    fl_ctx,
                    f"privacy filter at {fl_ctx.get_identity_name()}: optimizer state sent although weights are zeroed "
                    'or perturbed ("optimizer_state": "send"): its moments are running averages of this site\'s '
                    "gradients and carry no noise",
                )
            if done["optim_zeroed"]:
                parts.append(f"zeroed the optimizer moments of zeroed tensors ({len(done['optim_zeroed'])} key(s))")
            if any(done.values()):
                dxo.data, changed = params, True
        per_case, names = [], []
        if dxo.data_kind == DataKind.METRICS and isinstance(dxo.data, dict):
            data, per_case, names = self.filter_metrics(dxo.data)
            if per_case or names:
                dxo.data, changed = data, True
        meta, meta_per_case, meta_names = self.filter_metrics(dxo.meta or {})
        if meta_per_case or meta_names:  # e.g. "initial_metrics" that travel with weights
            dxo.meta, changed = meta, True
            per_case += [f"meta.{p}" for p in meta_per_case]
            names += [f"meta.{p}" for p in meta_names]
        if per_case:
            parts.append(f"removed per-case results {per_case}")
        if names:
            parts.append(f"removed case names {names}")
        if parts:
            site = fl_ctx.get_identity_name()
            task = fl_ctx.get_prop(FLContextKey.TASK_NAME, "?")
            self.log_info(fl_ctx, f"privacy filter at {site}, task {task}: " + "; ".join(parts))
        return dxo if changed else None
