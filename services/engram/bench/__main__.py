import sys

from engram.bench.run import main

sys.exit(main())
