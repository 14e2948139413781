"""fedseg_tools.bench.tuning: the hyper-parameters FedProx and FedSM may choose are chosen on validation Dice by one
rule (test Dice plays no part; a tie keeps the shipped default), and the benchmark plans their candidate runs."""

from __future__ import annotations

from fedseg_tools.bench.budget import run_specs
from fedseg_tools.bench.tuning import TUNING, best_validation, choose, tuning_key


def run(curve, test=0.5, status="ok", **args):
    return {
        "status": status,
        "curve": [(i / len(curve), v) for i, v in enumerate(curve, 1)],
        "test": test,
        "workflow_args": args,
    }


def cell(**runs):
    return {"dataset": "d", "seed": 0, "methods": runs}


def test_the_best_validation_dice_chooses_and_test_dice_does_not():
    c = cell(
        fedprox=run([0.5, 0.70, 0.69], test=0.9, fedprox_mu=0.01),
        **{
            tuning_key("fedprox", "fedprox_mu", 0.001): run([0.6, 0.71], test=0.1),  # best on validation
            tuning_key("fedprox", "fedprox_mu", 0.1): run([0.4, 0.65], test=0.99),  # best on test: not chosen
        },
    )
    got = choose(c, "fedprox")
    assert got["chosen"] == 0.001 and got["key"] == "fedprox-fedprox_mu0.001" and got["default"] == 0.01
    assert got["values"] == {0.01: 0.70, 0.001: 0.71, 0.1: 0.65} and got["param"] == "fedprox_mu"


def test_a_tie_keeps_the_default_and_an_incomplete_set_chooses_nothing():
    tie = cell(fedsm=run([0.8], lam=0.7), **{"fedsm-lam0.5": run([0.8]), "fedsm-lam0.9": run([0.79])})
    assert choose(tie, "fedsm")["chosen"] == 0.7
    failed = cell(fedsm=run([0.8], lam=0.7), **{"fedsm-lam0.5": run([0.9], status="missing")})
    assert choose(failed, "fedsm") is None  # a candidate without a result: no choice from an incomplete set
    assert choose(cell(fedsm=run([0.8], lam=0.7)), "fedsm") is None  # no candidate run
    assert best_validation(run([])) is None and best_validation(run([0.2, float("nan"), 0.3])) == 0.3


def test_the_benchmark_plans_one_equal_steps_run_per_candidate():
    methods = ["local", "centralized", "fedavg", "fedprox", "fedsm", "fedcross"]
    specs = {s.key: s for s in run_specs(methods, tuning=True)}
    expected = {tuning_key(m, TUNING[m][0], v) for m in ("fedprox", "fedsm") for v in TUNING[m][1]}
    tuned = {k for k, s in specs.items() if s.group == "tuning"}
    assert tuned == expected
    for key in tuned:
        s = specs[key]
        assert s.protocol == "equal" and list(s.options) == [TUNING[s.method][0]]
    assert not [s for s in run_specs(methods) if s.group == "tuning"]  # off unless asked for
    assert not [s for s in run_specs(["fedavg", "local"], tuning=True) if s.group == "tuning"]  # nothing to choose


def scored(curve, dice, **args):
    """A run record as the collector writes it: its validation curve and the headline model's test Dice per site."""
    rec = run(curve, **args)
    rec["headline_model"] = "global (best)"
    rec["results"] = {"models": {"global (best)": {"a": {"dice": dice}, "b": {"dice": dice}}}}
    return rec


def test_the_report_shows_every_candidate_the_choice_per_seed_and_the_chosen_runs_test_dice():
    from fedseg_tools.bench.tuning_report import tuning_facts, tuning_section

    cells = []
    for seed, (val_default, val_low, val_high) in enumerate([(0.70, 0.75, 0.60), (0.70, 0.60, 0.65)]):
        c = cell(
            fedprox=scored([val_default], 0.60, fedprox_mu=0.01),
            **{
                "fedprox-fedprox_mu0.001": scored([val_low], 0.50),
                "fedprox-fedprox_mu0.1": scored([val_high], 0.90),
            },
        )
        c["seed"], c["budget"] = seed, {"rounds": 2}
        cells.append(c)
    facts = tuning_facts(cells, "fedprox")
    assert facts["chosen"] == {0: 0.001, 1: 0.01} and facts["seeds"] == [0, 1]
    assert facts["tuned"] == [0.50, 0.60] and facts["default"] == [0.60, 0.60]
    assert facts["values"][0.1]["test"] == [0.90, 0.90] and facts["values"][0.01]["default"]
    assert tuning_facts(cells, "fedsm") is None
    text = "\n".join(tuning_section({"d": cells}))
    assert "## Hyper-parameters chosen on validation" in text and "**FedProx on d** (`fedprox_mu`, 2 seed(s))" in text
    assert "| 0.01 (default) | 0.700 ± 0.000 | 0.600 ± 0.000 | 1 |" in text
    assert "test Dice 0.550 ± 0.071 against 0.600 ± 0.000 at the default (-5.0 points" in text
    assert tuning_section({"d": [{**cells[0], "methods": {"fedprox": cells[0]["methods"]["fedprox"]}}]}) == []
