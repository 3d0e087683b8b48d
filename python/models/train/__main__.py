"""`python -m effkernels.models.train` and `torchrun -m effkernels.models.train`: effkernels-train.

An entry point only (nothing imports it), so the trainer package does not depend on the CLI."""
import sys

from ..cli.train import main

sys.exit(main())
