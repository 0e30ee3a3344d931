"""`python -m launch run RECIPE ...` — the entrypoint for `ray job submit`."""
import sys

from launch.cli import main

if __name__ == "__main__":  # worker processes (reward pool, vLLM) may import the main module
    sys.exit(main())
