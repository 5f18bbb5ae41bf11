import sys

from torch_lmdb.cli import main

sys.exit(main())
