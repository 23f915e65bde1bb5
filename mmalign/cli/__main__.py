"""``python -m mmalign.cli ...`` (the same as ``python -m mmalign ...``)."""

from . import main

main()
