import sys

from hs2p_jax.cli import main

sys.exit(main())
