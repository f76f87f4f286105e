import sys

from .cli import main

if __name__ == "__main__":  # guarded: worker processes of a local Dask cluster import this module
    sys.exit(main())
