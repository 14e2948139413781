"""The FedSeg POC tool (poc/fedseg_poc.py) in cohesive modules:

common      paths of the checkout, defaults, PocError and the log line
provision   POC project, data, localhost-only server, fedseg package, allow-list and authorization per kit
gpus        GPU detection and the plan (CUDA_VISIBLE_DEVICES per site, site capacity, job resource_spec)
processes   the POC's processes and listening sockets (psutil), commands in their own session, teardown kills
ports       the server port, reserved per POC root by a lock file per port
jobs        staging a job folder for this POC (GPU request, privacy scope, rounds)
flare_api   submission through the FLARE API with any admin kit (also used by poc/submit.py)
submission  submission through the `nvflare job` CLI and the admin console, and parsing their output
report      the per-site Dice table of a downloaded job
federation  PocFederation: prepare, start, submit, stop and status of one POC root
cli         the command line of poc/fedseg_poc.py
"""
