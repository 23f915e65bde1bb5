"""``python -m mmalign ...`` (what ``accelerate launch -m mmalign train ...`` runs on every process)."""

from .cli import main

main()
