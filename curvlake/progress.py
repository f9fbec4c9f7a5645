"""Progress bars: live on a terminal, a line now and then in logs (batch jobs, pipes)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm
from tqdm.notebook import tqdm_notebook

# Seconds between updates when stderr is a log file or a pipe (a SLURM job's output, CI).
LOG_INTERVAL = 30.0


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A ``tqdm`` bar; where stderr is not a terminal it redraws at most every ``LOG_INTERVAL``.

    A text bar in a log writes a new line per redraw (tqdm's default is 10 per second); notebook
    bars (``tqdm.auto`` in Jupyter) are widgets and keep tqdm's default.
    """
    if not issubclass(tqdm, tqdm_notebook) and not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(iterable, **kwargs)
