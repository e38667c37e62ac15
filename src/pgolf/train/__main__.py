"""`python -m pgolf.train` (e.g. under torchrun) = `pgolf run`, configured like the official script.

torchrun --standalone --nproc_per_node=8 -m pgolf.train --preset baseline --data DIR
NUM_LAYERS=4 ITERATIONS=400 python -m pgolf.train --preset baseline --data DIR
"""

import sys

from pgolf.cli import main

sys.exit(main(["run", *sys.argv[1:]]))
