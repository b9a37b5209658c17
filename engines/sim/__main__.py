"""``python -m engines.sim``: run the simulated engine."""

from engines.sim.cli import main

raise SystemExit(main())
