"""``python -m gradsae`` (also under ``torchrun``): the ``gradsae`` command."""

from gradsae.cli import main

raise SystemExit(main())
