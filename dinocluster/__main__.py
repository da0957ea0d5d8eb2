"""``python -m dinocluster``: the same as the ``dinocluster`` command."""

from dinocluster.cli import run

run()
