"""`python -m epi.real_cpu`: the documented command of the real-model experiment (epi.experiments.real_cpu)."""
import sys

from epi.experiments.real_cpu import main

if __name__ == "__main__":
    sys.exit(main())
