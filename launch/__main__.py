"""`python -m launch run RECIPE ...` — the entrypoint for `ray job submit`."""
import sys

from launch.cli import main

sys.exit(main())
