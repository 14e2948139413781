"""The benchmark report's tuning section: FedProx's mu and FedSM's lambda chosen per seed on validation Dice
(fedseg_tools.bench.tuning), each candidate's validation and test Dice, and the chosen runs' test Dice next to the
shipped default's."""

from __future__ import annotations

from fedseg_tools.bench import report_data as br
from fedseg_tools.bench.tuning import TUNING, choose


def tuning_facts(cells: list[dict], method: str) -> dict | None:
    """Over the seeds of one dataset: per candidate value its best validation Dice and test Dice per seed, the value
    chosen per seed, and the test Dice of the chosen run and of the default per seed (None: nothing was chosen)."""
    facts: dict = {"param": TUNING[method][0], "values": {}, "chosen": {}, "tuned": [], "default": [], "seeds": []}
    for c in cells:
        choice = choose(c, method)
        if choice is None:
            continue
        rounds = (c.get("budget") or {}).get("rounds") or 1
        test = {v: br.method_summary(c["methods"][key], rounds)["dice"] for v, key in choice["keys"].items()}
        for v, val in choice["values"].items():
            entry = facts["values"].setdefault(v, {"validation": [], "test": [], "default": v == choice["default"]})
            entry["validation"].append(val)
            entry["test"].append(test[v])
        facts["chosen"][c["seed"]] = choice["chosen"]
        facts["tuned"].append(test[choice["chosen"]])
        facts["default"].append(test[choice["default"]])
        facts["seeds"].append(c["seed"])
    return facts if facts["seeds"] else None


def tuning_section(cells_by_ds: dict[str, list[dict]]) -> list[str]:
    blocks: list[str] = []
    for ds, cells in cells_by_ds.items():
        for method in TUNING:
            facts = tuning_facts(cells, method)
            if facts is None:
                continue
            name, param = br.NAMES[method], facts["param"]
            rows = [
                [
                    f"{v:g}" + (" (default)" if e["default"] else ""),
                    br._pm(e["validation"]),
                    br._pm(e["test"]),
                    sum(1 for chosen in facts["chosen"].values() if chosen == v),
                ]
                for v, e in sorted(facts["values"].items())
            ]
            diff = [t - d for t, d in zip(facts["tuned"], facts["default"])]
            blocks += [
                f"**{name} on {ds}** (`{param}`, {len(facts['seeds'])} seed(s)):",
                "",
                br._table([param, "best validation Dice", "test Dice", "chosen in seeds"], rows),
                "",
                f"{name} with `{param}` chosen on validation: test Dice {br._pm(facts['tuned'])} against "
                f"{br._pm(facts['default'])} at the default ({br._pts(br._mean(diff))} points, mean over seeds).",
                "",
            ]
    if not blocks:
        return []
    return [
        "## Hyper-parameters chosen on validation",
        "",
        "FedProx's mu and FedSM's SoftPull lambda were also run at other values under the equal-steps plan (same data, "
        "seed and budget). Per seed, the value whose run reached the best validation Dice (the top of its validation "
        "curve, the score its best checkpoint was kept by) is chosen; a tie keeps the default; test Dice plays no part. "
        "FedSM's gamma is chosen inside every FedSM run on the same validation cases. Validation and test Dice: mean ± "
        "std over seeds; the method tables above show the defaults.",
        "",
        *blocks,
    ]
