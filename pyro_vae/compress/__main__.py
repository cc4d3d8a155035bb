"""`python -m pyro_vae.compress`: the codec's command line (pyro_vae.compress.main)."""

import sys

from . import main

sys.exit(main())
