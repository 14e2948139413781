#!/usr/bin/env python3
"""FedSeg POC: a local NVFlare federation of hospitals on this machine, bound to localhost only.

    python poc/fedseg_poc.py run|prepare|start|submit|status|stop ...    (--help: every command and flag)

The command line of the package poc_federation beside this file (poc_federation/cli.py), which holds the code.
`fedseg poc ...` runs this file by its path.
"""

import sys
from pathlib import Path

_POC_DIR = str(Path(__file__).resolve().parent)
if _POC_DIR not in sys.path:  # run as a script or loaded by path (fedseg_tools.cli): poc_federation sits beside it
    sys.path.insert(0, _POC_DIR)

from poc_federation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
