import sys

from mexc.simulator.cli import main

sys.exit(main())
