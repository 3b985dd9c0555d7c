"""``python -m kiln.tasks.training --config cfg.json``: one worker of a training job (see :mod:`.loop`)."""

from kiln.tasks.training.loop import main

main()
