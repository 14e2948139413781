"""`python -m fedseg.infer fedsm`: segment new NIfTI images with a trained FedSM model set (super model).

    python -m fedseg.infer fedsm --models WS/server/simulate_job/app_server/fedsm/best.pt \\
        --input DIR_OR_DATALIST.json --out OUT [--gamma 0.9] [--section testing] [--labels LABEL_DIR]

Per case: q = softmax(selector(x)); if max q > gamma the predicted site's personalized model segments the
image, else the global model. Writes <case>_seg.nii.gz (the input's affine) and summary.json / summary.csv
recording which model was chosen, with what confidence, the selector's probabilities and, when a label
exists, the Dice. A SoftPull model set (no selector) uses the global model, or --site NAME's personalized one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from monai.transforms import Compose

from fedseg.inference_io import (
    add_common_arguments,
    case_dice,
    first_path,
    list_cases,
    write_nifti_like,
    write_summary,
)


def run_fedsm(o: argparse.Namespace) -> int:
    from fedseg.algorithms.routing import GLOBAL, route
    from fedseg.engine import EngineConfig, SegEngine, load_numpy_state
    from fedseg.engine.engine import eval_transforms
    from fedseg.methods.fedsm import SelectorSettings, new_selector, selector_probs
    from fedseg.modelset import load_model_set

    groups, info = load_model_set(o.models)
    cfg = EngineConfig.from_dict(info["engine"])
    engine = SegEngine(cfg, {}, site="inference")
    site_names = list(info["site_names"])
    gamma = float(info["gamma"] if o.gamma is None else o.gamma)

    def net_from(params, what):
        net = engine.new_network()
        load_numpy_state(net, params, site=what)
        return net

    nets = {GLOBAL: net_from(groups["global"], "global model")}
    nets.update({s: net_from(p, f"personalized model of {s}") for s, p in groups["personal"].items()})
    selector = None
    if "selector" in groups and not o.site:
        if "norm" not in (info.get("selector") or {}):
            raise SystemExit(
                f"{o.models}: saved by an older FedSeg whose selector (32-pixel thumbnail classifier) this "
                f"version cannot load; retrain, or skip the selector with --site NAME"
            )
        settings = SelectorSettings.from_meta(len(site_names), info.get("selector"))
        selector = new_selector(engine, settings)
        load_numpy_state(selector, groups["selector"], site="selector")
    elif o.site and o.site not in nets:
        raise SystemExit(f"--site {o.site}: the model set has personalized models for {sorted(groups['personal'])}")

    cases = list_cases(o.input, o.section, o.labels)
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    how = f"selector with gamma={gamma}" if selector else f"personalized model of {o.site}" if o.site else "global model"
    print(f"FedSM model set {o.models} (round {info.get('round')}), {how}; {len(cases)} case(s) -> {out}", flush=True)
    rows = []
    for i, case in enumerate(cases):
        start = time.perf_counter()
        keys = ("image", "label") if "label" in case else ("image",)
        item = Compose(eval_transforms(keys))({k: case[k] for k in keys})
        item = {k: (v.as_tensor() if hasattr(v, "as_tensor") else v) for k, v in item.items()}
        image = item["image"].unsqueeze(0)
        row = {"case": case["name"], "image": first_path(case["image"])}
        if selector is not None:
            probs = selector_probs(engine, selector, item["image_raw"].unsqueeze(0), settings.size(cfg.spatial_dims))[0]
            choice = route(probs, site_names, gamma)
            model = choice.model
            row.update(
                {
                    "model": model,
                    "confidence": choice.confidence,
                    "predicted_site": site_names[choice.site_index],
                    "selector_probs": dict(zip(site_names, (float(p) for p in probs))),
                }
            )
        else:
            model = o.site or GLOBAL
            row.update({"model": model, "confidence": 1.0})
        seg = engine.predict_probs(nets[model], image).argmax(dim=1)[0].cpu()
        name = f"{case['name']}_seg.nii.gz"
        write_nifti_like(row["image"], seg.numpy().astype(np.uint8 if cfg.num_classes <= 255 else np.int16), out / name)
        row["segmentation"] = name
        if "label" in item:
            per_class = case_dice(seg, item["label"][0].long(), cfg.num_classes)
            row["dice"] = float(np.mean(per_class))
        rows.append(row)
        print(
            f"[{i + 1}/{len(cases)}] {case['name']}: {row['model']} (confidence {row['confidence']:.3f})"
            + (f", dice {row['dice']:.4f}" if "dice" in row else "")
            + f" ({time.perf_counter() - start:.1f}s)",
            flush=True,
        )
    header = {
        "command": "fedsm",
        "models": str(Path(o.models).resolve()),
        "gamma": gamma,
        "site_names": site_names,
        "routing": {m: sum(r["model"] == m for r in rows) for m in sorted({r["model"] for r in rows})},
    }
    write_summary(out, rows, header)
    print(f"routing: {header['routing']}; wrote {out / 'summary.json'}")
    return 0


def add_fedsm_parser(sub) -> None:
    p = sub.add_parser(
        "fedsm",
        help="FedSM model set: the selector routes each image to a personalized or the global model",
        description="Segment with a FedSM (or SoftPull) model set (best.pt / last.pt).",
    )
    add_common_arguments(p, "FedSM")
    p.add_argument("--gamma", type=float, help="routing threshold (default: the job's)")
    p.add_argument("--site", help="skip the selector and use this site's personalized model")
    p.set_defaults(run=run_fedsm)
