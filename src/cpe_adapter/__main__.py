"""``python -m cpe_adapter``: the same as the ``cpe-adapter`` command."""

from .cli import main

raise SystemExit(main())
