"""FedCross / FedCrossEns site tasks on the SegExecutor: cross_train and cross_validate
(FLModel <-> fedseg.methods.fedcross)."""

from __future__ import annotations

from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedseg.algorithms.packing import pack, unpack
from fedseg.fl.privacy import check_scorable_section
from fedseg.algorithms.lr_schedule import LrSchedule
from fedseg.methods.fedcross import cross_visit, score_ensemble
from fedseg.modelset import member_key


def register(executor) -> None:
    executor.handlers["cross_train"] = lambda model, fl_ctx, abort: cross_train(executor, model, fl_ctx, abort)
    executor.handlers["cross_validate"] = lambda model, fl_ctx, abort: cross_validate(executor, model, fl_ctx, abort)


def cross_train(executor, model: FLModel, fl_ctx, abort_signal) -> FLModel:
    """One visit: params = pack({"model": weights, "optim": optimizer state}); meta says which model, its
    schedule position and the visit budget."""
    meta = model.meta or {}
    groups = unpack(model.params)
    m, c = int(meta["model_index"]), int(meta["communication"])
    visits_done = int(meta.get("visits_done", 0))
    engine = executor.engine
    steps = engine.local_steps(epochs=meta.get("visit_epochs") or None, steps=meta.get("visit_steps") or None)
    schedule = LrSchedule.from_meta(meta["lr_schedule"])
    weights, optim, stats = cross_visit(
        engine,
        groups["model"],
        groups.get("optim"),
        steps,
        schedule,
        visits_done,
        should_stop=lambda: abort_signal.triggered,
        on_step=executor.progress(fl_ctx, f"cross_model{m}", c),
    )
    executor.track(f"fedcross/model{m}_train_loss", stats.mean_loss, c)
    executor.local_params = weights
    lr_first, lr_last = schedule.lr(visits_done), schedule.lr(visits_done + (stats.steps - 1) / max(steps, 1))
    executor.log_info(
        fl_ctx,
        f"FedCross communication {c}: model {m} (visit {visits_done + 1}) trained {stats.steps} steps, "
        f"loss {stats.mean_loss:.4f}, lr {lr_first:.2e} -> {lr_last:.2e}",
    )
    return FLModel(
        params=pack({"model": weights, "optim": optim}),
        params_type=ParamsType.FULL,
        metrics={"train_loss": stats.mean_loss, "lr_first": lr_first, "lr_last": lr_last},
        meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: stats.steps, "model_index": m, "communication": c},
    )


def _summary(result) -> dict:
    summary = result.summary()
    summary["dice_per_case"] = [float(x) for x in result.case_dice]
    return summary


def cross_validate(executor, model: FLModel, fl_ctx, abort_signal) -> FLModel:
    """Scores the K models sent (groups m0, m1, ...) and their ensemble on a section of this site's data
    (validation or testing only). Case names are not sent: the server has no use for them."""
    meta = model.meta or {}
    groups = unpack(model.params)
    k = int(meta["num_models"])
    engine = executor.engine
    section = check_scorable_section(executor.site, meta.get("section", "validation"))
    if not engine.cases(section):
        fallback = "validation" if section != "validation" else "testing"
        executor.log_warning(fl_ctx, f"no '{section}' cases at {executor.site}; scoring '{fallback}' instead")
        section = fallback
    metrics = {"section": section, "engine": engine.cfg.to_dict()}
    if not engine.cases(section):
        executor.log_warning(fl_ctx, f"{executor.site} has no cases to score the ensemble on")
        return FLModel(metrics={**metrics, "n_cases": 0})
    nets = [executor.new_net(groups[member_key(m)]) for m in range(k)]
    # HD95 is costly: only for the final test scoring, not every communication's validation
    scored = score_ensemble(engine, nets, section, with_hd95=executor.hd95 and section == "testing")
    metrics.update(
        {
            "n_cases": len(scored.ensemble.case_names),
            "ensemble": _summary(scored.ensemble),
            "members": [_summary(r) for r in scored.members],
            "uncertainty": scored.uncertainty(),
        }
    )
    u = metrics["uncertainty"]
    executor.log_info(
        fl_ctx,
        f"FedCross {section} at {executor.site}: ensemble dice {metrics['ensemble']['dice']:.4f}, members "
        + ", ".join(f"{s['dice']:.4f}" for s in metrics["members"])
        + f"; mean std wrong {u['mean_std_wrong']:.4f} vs right {u['mean_std_right']:.4f}, "
        f"AUROC of the std for wrong voxels {u['auroc']:.4f}",
    )
    return FLModel(metrics=metrics)
