import sys

from moe_offload.cli import main

sys.exit(main())
