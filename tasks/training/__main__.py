"""``python -m kiln.tasks.training --config cfg.json``: one worker of a training job (see :mod:`.runner`)."""

from kiln.tasks.training.runner import main

main()
