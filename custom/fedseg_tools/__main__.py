import sys

from fedseg_tools.cli import main

sys.exit(main())
