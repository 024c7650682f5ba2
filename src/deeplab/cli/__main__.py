"""``python -m deeplab.cli`` (what ``torchrun -m deeplab.cli train ...`` runs)."""

import sys

from deeplab.cli import main

sys.exit(main())
