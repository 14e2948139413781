import sys

from fedseg.export.bundle import main

sys.exit(main())
