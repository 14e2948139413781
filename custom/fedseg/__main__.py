import sys

from fedseg.cli import main

sys.exit(main())
