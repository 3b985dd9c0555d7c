"""The training job the launchers run: its config, the DDP loop, networks and checkpoints."""
