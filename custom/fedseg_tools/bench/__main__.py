import sys

from fedseg_tools.bench.run import main

sys.exit(main())
