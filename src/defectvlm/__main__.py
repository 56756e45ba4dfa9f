"""`python -m defectvlm` (what `torchrun ... -m defectvlm train` runs)."""

import sys

from defectvlm.cli import main

sys.exit(main())
