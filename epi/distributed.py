"""`python -m epi.distributed`: the documented torchrun entry point (the code is epi.integrations.distributed)."""
from epi.integrations.distributed import main

if __name__ == "__main__":
    main()
