"""Small test helpers shared by several test files (importable as ``helpers``)."""

from __future__ import annotations

from qatlab.methods import Hook


class Killer(Hook):
    """Interrupts training (like Ctrl-C) when ``at`` steps are done; ``None`` never does."""

    def __init__(self, at: int | None) -> None:
        self.at = at

    def after_step(self, model, step, total_steps):
        if self.at is not None and step + 1 == self.at:
            raise KeyboardInterrupt
        return None
