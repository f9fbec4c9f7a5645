"""Command groups of the ``curvlake`` command line, one module each (see :mod:`curvlake.cli`)."""
