"""``python -m mmkit_cli``: the same as the ``mmkit`` command."""

from mmkit_cli.main import main

main()
