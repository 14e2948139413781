"""FedSeg's tooling around the runtime: the benchmark (bench/), the local-only and centralized baselines runner, the
demo, the simulator runner (sim), the `fedseg` command (cli) and the localhost POC environments (poc_env,
localhost_poc). It imports the runtime package `fedseg`; the runtime never imports it, and site kits and jobs
carry only the runtime (tests/test_architecture.py)."""
