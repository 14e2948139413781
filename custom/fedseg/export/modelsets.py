"""What a FedSeg model-set file holds and which exportable models it offers.

A model set is what a job's server writes (fedseg.modelset): FedAvg/FedProx's <run>/app_server/fedavg/
{best,last}.pt ({"global"}), FedCross/FedCrossEns's .../fedcross/{best,last}.pt (K members) and FedSM/SoftPull's
.../fedsm/{best,last}.pt (global, personalized per site, selector). Model names:

    global              the FedAvg/FedProx global model, or FedSM's global model
    member:<i>          FedCross member i (0-based)
    ensemble            FedCross/FedCrossEns: mean softmax of all members
    personalized:<site> FedSM/SoftPull: that site's personalized model
    super               FedSM: the selector routes each image to a personalized or the global model

FedCross and FedSM sets record the engine settings they were trained with; a FedAvg/FedProx set does not, so
they come from the job's site config (config/config_fed_client.json) in the run's app folder next to it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from fedseg.engine.config import EngineConfig
from fedseg.modelset import load_model_set

NETWORK_PREFIX = "net."  # SegNetwork keeps the MONAI network as .net: its keys are "net.<MONAI key>"
GLOBAL, ENSEMBLE, SUPER = "global", "ensemble", "super"
MEMBER, PERSONALIZED = "member", "personalized"


class ExportError(ValueError):
    """A model set, a model name or an output folder that cannot be exported; the message names the file."""


@dataclass
class TrainedModels:
    """One model-set file: its kind ("fedavg", "fedcross" or "fedsm"), weights, info and engine settings."""

    path: Path
    kind: str
    groups: dict
    info: dict
    engine: EngineConfig
    provenance: dict = field(default_factory=dict)

    def model_names(self) -> list[str]:
        if self.kind == "fedavg":
            return [GLOBAL]
        if self.kind == "fedcross":
            return [ENSEMBLE] + [f"{MEMBER}:{m}" for m in range(self.num_members())]
        names = [GLOBAL] + [f"{PERSONALIZED}:{s}" for s in sorted(self.groups.get("personal", {}))]
        return ([SUPER] if "selector" in self.groups else []) + names

    def default_model(self) -> str:
        """What the job exists for: the ensemble, the super model (SoftPull: the global model), the global model."""
        return self.model_names()[0]

    def num_members(self) -> int:
        return int(self.info.get("num_models", len(self.groups.get("members", {}))))

    def site_names(self) -> list[str]:
        """FedSM: the selector's classes, in its output order."""
        return [str(s) for s in self.info.get("site_names") or []]

    def check_model(self, name: str) -> str:
        """`name` if this set has it, else ExportError listing the ones it has."""
        available = self.model_names()
        if name in available:
            return name
        what = {"fedavg": "a FedAvg/FedProx", "fedcross": "a FedCross", "fedsm": "a FedSM/SoftPull"}[self.kind]
        known = name in (GLOBAL, ENSEMBLE, SUPER) or name.partition(":")[0] in (MEMBER, PERSONALIZED)
        reason = "is not in" if known else "is not a model name of"
        hint = " (a SoftPull set has no selector, hence no super model)" if name == SUPER and self.kind == "fedsm" else ""
        raise ExportError(f"{self.path}: model {name!r} {reason} {what} model set{hint}; it has: {', '.join(available)}")

    def network_weights(self, name: str) -> dict:
        """Weights of one segmentation network (global, member:<i>, personalized:<site>), keys as in the set."""
        self.check_model(name)
        kind, _, arg = name.partition(":")
        if kind == GLOBAL:
            return self.groups["global"]
        if kind == MEMBER:
            return self.groups["members"][f"m{int(arg)}"]
        if kind == PERSONALIZED:
            return self.groups["personal"][arg]
        raise ExportError(f"{self.path}: {name!r} combines several networks; network_weights() takes one network")

    def selector_settings(self):
        """FedSM's SelectorSettings as trained (the bundle's selector must match it)."""
        from fedseg.methods.fedsm import SelectorSettings

        settings = self.info.get("selector") or {}
        if "norm" not in settings:
            raise ExportError(
                f"{self.path}: saved by an older FedSeg whose selector (32-pixel thumbnail classifier) "
                "this version cannot export; retrain, or export a personalized or the global model"
            )
        return SelectorSettings.from_meta(len(self.site_names()), settings)


def plain_monai_weights(weights: dict, where: str) -> dict:
    """The MONAI network's own state dict: FedSeg's "net." prefix dropped, as float tensors keyed like the plain
    monai.networks.nets class, so it loads with load_state_dict(strict=True) and no renaming."""
    import numpy as np
    import torch

    wrong = sorted(k for k in weights if not k.startswith(NETWORK_PREFIX))
    if wrong:
        raise ExportError(f"{where}: not a FedSeg segmentation network (keys without {NETWORK_PREFIX!r}: {wrong[:3]})")
    return {k[len(NETWORK_PREFIX) :]: torch.as_tensor(np.array(v)) for k, v in weights.items()}


def kind_of(path: Path, groups: dict, info: dict) -> str:
    method = info.get("method")
    if method == "fedcross" and "members" in groups:
        return "fedcross"
    if method == "fedsm" and "global" in groups and "personal" in groups:
        return "fedsm"
    if method is None and set(groups) == {"global"}:
        return "fedavg"
    raise ExportError(
        f"{path}: not a FedSeg model set of a known kind (method {method!r}, groups {sorted(groups)}); "
        "expected the best.pt/last.pt of a FedAvg/FedProx, FedCross/FedCrossEns or FedSM/SoftPull job"
    )


def find_app_dir(path: Path) -> Path | None:
    """The run's app folder holding config/ (the model set lies in <app>/<results_dir>/), or None."""
    for folder in list(path.resolve().parents)[:3]:
        if (folder / "config" / "config_fed_client.json").is_file():
            return folder
    return None


def client_config_file(job_config: str | Path) -> Path:
    """--job-config: a config_fed_client.json, or a job/app/run folder that has one (config/, app/config/)."""
    job_config = Path(job_config)
    if job_config.is_file():
        return job_config
    for candidate in (
        job_config / "config_fed_client.json",
        job_config / "config" / "config_fed_client.json",
        job_config / "app" / "config" / "config_fed_client.json",
    ):
        if candidate.is_file():
            return candidate
    raise ExportError(f"--job-config {job_config}: no config_fed_client.json there (nor in config/ or app/config/)")


def engine_from_client_config(config_file: Path) -> EngineConfig:
    try:
        config = json.loads(config_file.read_text())
        engine = config["executors"][0]["executor"]["args"].get("engine")
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ExportError(f"{config_file}: cannot read the site executor's engine settings ({type(e).__name__}: {e})") from e
    try:
        return EngineConfig.from_dict(engine)  # what the site executor builds from the same settings
    except (TypeError, ValueError) as e:
        raise ExportError(f"{config_file}: engine settings: {e}") from e


def job_provenance(app_dir: Path | None, kind: str, info: dict) -> dict:
    """Which job trained the set: the run's meta.json name and (FedAvg/FedProx) the server workflow's mu."""
    out: dict = {}
    if app_dir is not None:
        meta = app_dir.parent / "meta.json"
        if meta.is_file():
            try:
                out["job"] = json.loads(meta.read_text()).get("name")
            except ValueError:
                pass
        server = app_dir / "config" / "config_fed_server.json"
        if kind == "fedavg" and server.is_file():
            try:
                args = json.loads(server.read_text())["workflows"][0]["args"]
                out["method"] = "fedprox" if float(args.get("fedprox_mu") or 0) > 0 else "fedavg"
                if out["method"] == "fedprox":
                    out["fedprox_mu"] = float(args["fedprox_mu"])
            except (ValueError, KeyError, IndexError, TypeError):
                pass
    if kind == "fedcross":
        out["method"] = "fedcrossens" if int(info.get("num_models", 1)) > 1 else "fedcross"
    elif kind == "fedsm":
        out["method"] = "fedsm" if info.get("use_selector", True) else "softpull"
    out.setdefault("method", "fedavg/fedprox")
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_trained_models(path: str | Path, job_config: str | Path | None = None) -> TrainedModels:
    """Load a model-set file and find its engine settings; every problem is an ExportError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such model-set file (a job's <run>/app_server/<method>/best.pt or last.pt)")
    try:
        groups, info = load_model_set(path)
    except (RuntimeError, OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as e:
        # what torch.load (weights only) and the info's JSON raise for a file that is not a model set
        raise ExportError(f"{path}: not a readable FedSeg model set ({type(e).__name__}: {e})") from e
    kind = kind_of(path, groups, info)
    app_dir = find_app_dir(path)
    if job_config is not None:
        engine_source = client_config_file(job_config)
        engine = engine_from_client_config(engine_source)
    elif info.get("engine"):
        engine_source = path
        try:
            engine = EngineConfig.from_dict(info["engine"])
        except (TypeError, ValueError) as e:
            raise ExportError(f"{path}: engine settings recorded in the model set: {e}") from e
    elif app_dir is not None:
        engine_source = app_dir / "config" / "config_fed_client.json"
        engine = engine_from_client_config(engine_source)
    else:
        raise ExportError(
            f"{path}: the model set records no engine settings (a FedAvg/FedProx set) and no "
            "config/config_fed_client.json lies in the folders above it; pass --job-config with the "
            "job's config_fed_client.json (or the job folder)"
        )
    trained = TrainedModels(path=path, kind=kind, groups=groups, info=info, engine=engine)
    if kind == "fedsm":
        missing = [s for s in trained.site_names() if s not in groups["personal"]]
        if "selector" in groups and missing:
            raise ExportError(f"{path}: the selector's sites {missing} have no personalized model in the set")
    counter = {"fedavg": "round", "fedsm": "round", "fedcross": "communication"}[kind]
    trained.provenance = {
        **job_provenance(app_dir, kind, info),
        "model_set": str(path.resolve()),
        "model_set_sha256": sha256(path),
        "engine_settings_from": str(Path(engine_source).resolve()),
        counter: info.get(counter),
        **{
            k: info[k]
            for k in (
                "best_round",
                "best_score",
                "val_dice",
                "val_score",
                "score_key",
                "num_models",
                "sites",
                "site_names",
                "gamma",
                "lam",
            )
            if info.get(k) is not None
        },
    }
    return trained
