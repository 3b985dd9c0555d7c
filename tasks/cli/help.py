"""What every ``kiln`` subcommand's parser shares: its help layout, with the examples shown as written."""

from __future__ import annotations

import argparse
from typing import Any


def add_command(sub: Any, name: str, summary: str, examples: str, **kwargs: Any) -> argparse.ArgumentParser:
    """Add subcommand ``name`` to ``sub`` with a one-line ``summary`` and an ``examples`` block in its help."""
    return sub.add_parser(name, help=summary, description=summary, epilog=f"examples:\n{examples}",
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
