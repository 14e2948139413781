"""What `prepare` writes: the POC project, the built-in or given data, and per kit the localhost-only server,
the fedseg package, its allow-list, FedSeg's authorization policy and each site's own configuration."""

from __future__ import annotations

import json
import re
import shutil
import string
from pathlib import Path

from .common import AUTHZ_FILE, PACKAGE, PRIVACY_FILE, PocError, log  # first: it puts custom/ on sys.path

# isort: split
from fedseg_tools import localhost_poc
from fedseg_tools.localhost_poc import write_site_config as write_site_config  # federation.py calls it from here


def hospital_names(n: int) -> list[str]:
    if not 1 <= n <= 26:
        raise PocError(f"--sites must be between 1 and 26, got {n}")
    return [f"hospital-{c}" for c in string.ascii_lowercase[:n]]


def org_of(site: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", site)


def render_project(template: Path, sites: list[str] | None, port: int) -> dict:
    """The POC project: the template with its client list replaced (when sites is given) and the port set."""
    import yaml

    project = yaml.safe_load(Path(template).read_text())
    participants = project["participants"]
    servers = [p for p in participants if p.get("type") == "server"]
    if len(servers) != 1:
        raise PocError(f"{template}: expected exactly one server participant")
    servers[0]["fed_learn_port"] = int(port)
    servers[0].pop("admin_port", None)  # admin console on the FL port
    if sites is not None:
        others = [p for p in participants if p.get("type") != "client"]
        clients = [{"name": s, "type": "client", "org": org_of(s)} for s in sites]
        project["participants"] = others[:1] + clients + others[1:]
    if not [p for p in project["participants"] if p.get("type") == "client"]:
        raise PocError("the POC project has no client sites")
    return project


def participants_of(project: dict, kind: str) -> list[dict]:
    return [p for p in project["participants"] if p.get("type") == kind]


def load_authorization_policy(path: Path = AUTHZ_FILE) -> dict:
    """FedSeg's authorization policy, checked: NVFlare parses it, and no role has the byoc right."""
    from nvflare.security.security import FLAuthorizer

    from fedseg.fl.allowlist import byoc_roles

    policy = json.loads(Path(path).read_text())
    FLAuthorizer("fedseg", policy)  # raises SyntaxError on an invalid policy
    byoc = byoc_roles(policy)
    if byoc:
        raise PocError(f"{path}: role(s) {byoc} would have the byoc right (run code a job brings); FedSeg jobs need none")
    return policy


def prepare_data(data_root: Path, sites: list[str], size: str, dims: int, seed: int) -> dict[str, Path]:
    """Built-in dataset with one folder per hospital: generate_dataset writes site-1..N, renamed here to the
    hospital names (datalist paths are relative to their folder, so moving a folder keeps it valid)."""
    from fedseg.data.synthetic import generate_dataset

    wanted = {"sites": sites, "size": size, "dims": dims, "seed": seed}
    marker = data_root / "fedseg_poc_data.json"
    if (
        marker.exists()
        and json.loads(marker.read_text()) == wanted
        and all((data_root / s / "datalist.json").exists() for s in sites)
    ):
        log(f"dataset: reusing {data_root}")
    else:
        shutil.rmtree(data_root, ignore_errors=True)
        log(f"dataset: generating the built-in {size} {dims}-D dataset for {len(sites)} sites in {data_root}")
        generate_dataset(str(data_root), n_sites=len(sites), spatial_dims=dims, seed=seed, size=size)
        for k, site in enumerate(sites, start=1):
            (data_root / f"site-{k}").rename(data_root / site)
            datalist_file = data_root / site / "datalist.json"
            datalist = json.loads(datalist_file.read_text())
            datalist["site"] = site
            datalist_file.write_text(json.dumps(datalist, indent=2))
        marker.write_text(json.dumps(wanted, indent=2))
    return {s: (data_root / s / "datalist.json").resolve() for s in sites}


def user_data(data: Path, sites: list[str]) -> dict[str, Path]:
    """--data DIR: DIR/<site>/datalist.json for every site (the FEDSEG_DATA convention)."""
    paths = {s: (Path(data) / s / "datalist.json").resolve() for s in sites}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise PocError(f"--data {data}: missing datalist(s): {', '.join(missing)}")
    return paths


def bind_server_to_localhost(prod: Path, server: str, sites: list[str], port: int) -> None:
    """Server FL and admin endpoints on localhost:port (a non-loopback target makes the server listen on all
    interfaces); every site must connect there."""
    localhost_poc.bind_server_to_localhost(prod / server, port)
    for site in sites:
        problem = localhost_poc.site_target_problem(prod / site, port)
        if problem:
            raise PocError(problem)


def install_fedseg(kit: Path, policy: dict) -> None:
    """The fedseg package where the server or site loads it (local/custom, as a hospital installs it), its classes
    allowed (exact class paths) and FedSeg's authorization policy as local/authorization.json."""
    localhost_poc.install_fedseg(kit, PACKAGE, policy)


def install_privacy_scope(kit: Path) -> None:
    """poc/privacy.json as the site's local/privacy.json: a privacy scope the site enforces on every job."""
    shutil.copy(PRIVACY_FILE, kit / "local" / "privacy.json")
