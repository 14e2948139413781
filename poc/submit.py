#!/usr/bin/env python3
"""Submit a FedSeg job with the FLARE API, wait for it, download the result and print the per-site Dice table.

Works with any admin startup kit: the POC's (workspaces/poc/flare/<project>/prod_00/<user>) or one that
provisioning made for a real deployment. The job is signed with the kit's certificate on submission.

    python poc/submit.py --kit PATH/TO/lead@hospital-a.org --job jobs/fedavg [--user lead@hospital-a.org]
                         [--timeout 3600] [--download DIR] [--no-wait] [--abort-on-timeout]

Exit code: 0 when the job finished with status FINISHED:COMPLETED, 1 otherwise, 2 when the server refused
the submission (e.g. a "member" user: no submit_job right).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from poc_federation.flare_api import submit_job  # noqa: E402
from poc_federation.report import print_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from nvflare.fuel.flare_api.api_spec import AuthorizationError

    p = argparse.ArgumentParser(prog="poc/submit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kit", required=True, help="admin startup kit folder (holds startup/fed_admin.json)")
    p.add_argument("--job", required=True, help="job folder, e.g. jobs/fedavg")
    p.add_argument("--user", help="user name (default: the kit folder's name)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job (default 3600)")
    p.add_argument("--download", help="move the downloaded result here (default: the kit's transfer/ folder)")
    p.add_argument("--no-wait", action="store_true", help="only submit and print the job id")
    p.add_argument("--abort-on-timeout", action="store_true")
    o = p.parse_args(argv)
    try:
        outcome = submit_job(
            o.kit,
            o.job,
            o.user,
            wait=not o.no_wait,
            timeout=o.timeout,
            download_to=None if o.no_wait else (o.download or ""),
            abort_on_timeout=o.abort_on_timeout,
        )
    except AuthorizationError as e:
        print(f"submission refused: {e}", file=sys.stderr)
        return 2
    except TimeoutError as e:
        print(str(e), file=sys.stderr)
        return 1
    if o.no_wait:
        print(json.dumps({"job_id": outcome.job_id}))
        return 0
    if outcome.result_dir:
        print_results(outcome.result_dir)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
