import sys

from fedseg.bench.run import main

sys.exit(main())
