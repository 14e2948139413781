"""FedSM site tasks on the SegExecutor: fedsm_train and fedsm_evaluate (FLModel <-> fedseg.methods.fedsm)."""

from __future__ import annotations

from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedseg.algorithms.packing import pack, unpack
from fedseg.engine import load_numpy_state
from fedseg.fl.privacy import check_scorable_section
from fedseg.methods.fedsm import SelectorSettings, fedsm_local_round, new_selector, score_super_model

PERSONAL_PREFIX = "personal:"


def register(executor) -> None:
    executor.handlers["fedsm_train"] = lambda model, fl_ctx, abort: fedsm_train(executor, model, fl_ctx, abort)
    executor.handlers["fedsm_evaluate"] = lambda model, fl_ctx, abort: fedsm_evaluate(executor, model, fl_ctx, abort)


def _site_index(executor, site_names: list[str]) -> int:
    if executor.site not in site_names:
        raise ValueError(f"site {executor.site} is not in the server's site mapping {site_names}")
    return site_names.index(executor.site)


def fedsm_train(executor, model: FLModel, fl_ctx, abort_signal) -> FLModel:
    meta = model.meta or {}
    site_names = list(meta["site_names"])
    rnd = int(model.current_round or 0)
    engine = executor.engine
    steps = engine.local_steps(epochs=meta.get("local_epochs"), steps=meta.get("local_steps"))
    updated, metrics, seg_steps = fedsm_local_round(
        engine,
        unpack(model.params),
        _site_index(executor, site_names),
        site_names,
        meta.get("selector"),
        float(meta.get("gamma", 0.9)),
        steps,
        should_stop=lambda: abort_signal.triggered,
        on_step=executor.progress(fl_ctx, "fedsm_global", rnd),
        seed=engine.cfg.seed + rnd,
    )
    for key, value in metrics.items():
        executor.track(f"fedsm/{key}", value, rnd)
    executor.local_params = updated["personal"]  # cross-site evaluation would see this site's personalized model
    executor.log_info(fl_ctx, f"FedSM round {rnd}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return FLModel(
        params=pack(updated),
        params_type=ParamsType.FULL,
        metrics=metrics,
        meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: seg_steps},
    )


def fedsm_evaluate(executor, model: FLModel, fl_ctx, abort_signal) -> FLModel:
    """Scores the final model set on this site's test cases: global, own personalized, super model, the selector's
    routing (accuracy, routed to own model, counts per model) and, when the server sends "gammas", the super
    model's Dice at each of them (validation or testing only)."""
    meta = model.meta or {}
    site_names = list(meta["site_names"])
    section = check_scorable_section(executor.site, meta.get("section", "testing"))
    groups = unpack(model.params)
    engine = executor.engine
    settings = SelectorSettings.from_meta(len(site_names), meta.get("selector") or {})
    global_net = executor.new_net(groups["global"])
    personal = {k[len(PERSONAL_PREFIX):]: executor.new_net(v) for k, v in groups.items() if k.startswith(PERSONAL_PREFIX)}
    selector = None
    if "selector" in groups:
        selector = new_selector(engine, settings)
        load_numpy_state(selector, groups["selector"], executor.site)
    _site_index(executor, site_names)
    gammas = meta.get("gammas")
    scored = score_super_model(engine, global_net, personal, selector, site_names, executor.site,
                               float(meta.get("gamma", 0.9)), settings.size(engine.cfg.spatial_dims), section, with_hd95=executor.hd95,
                               gammas=[float(g) for g in gammas] if isinstance(gammas, (list, tuple)) else None)
    metrics = {"section": section}
    for key in ("selector_accuracy", "routed_own", "routing", "mean_confidence", "gamma_sweep"):
        if key in scored:
            metrics[key] = scored[key]
    for name, result in scored["scores"].items():
        summary = result.summary()
        summary["dice_per_case"] = [float(x) for x in result.case_dice]
        metrics[name] = summary
    executor.log_info(fl_ctx, "FedSM evaluation: " + ", ".join(f"{n} {metrics[n]['dice']:.4f}" for n in scored["scores"])
                      + (f", selector accuracy {scored['selector_accuracy']:.3f}, routed to own model "
                         f"{scored['routed_own']:.3f}, routing {scored['routing']}" if selector else ""))
    return FLModel(metrics=metrics)
