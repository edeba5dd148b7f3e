"""Training methods: each a set of :class:`Hook` objects usable in any training loop, and the
registry that lets the trainer and the CLI build them by name.

A method module registers a builder; its keyword arguments *are* the method's options, with
their defaults, and the first line of its docstring is the method's description::

    @register_method("dampen", aliases={"lambda": "lambda_max"}, needs_quant=True)
    def _dampen(model, quant, total_steps, lambda_max: float = 0.1):
        "QAT with oscillation dampening (Nagel et al. 2022)."
        return [OscillationDampening(lambda_max)]

and is imported at the bottom of this file (one line per module). The registry itself lives in
:mod:`qatlab.methods.registry`, a leaf that method modules import (never this package, which
imports them). Options are checked in one place, :func:`check_options`, before any run starts:
names and types against the defaults, values by the method's own ``check`` (an argument of
:func:`register_method`); ``aliases`` let generic CLI flags (``--lambda``, ``--target-bits``,
``--rho``) reach a method's own option names. This package never imports :mod:`qatlab.train`.
"""

from __future__ import annotations

from qatlab.methods.base import Hook, OptimizerWrapper, frozen_bn_stats
from qatlab.methods.registry import (
    METHODS,
    MethodSpec,
    build_hooks,
    check_options,
    get_method,
    list_methods,
    register_method,
)

__all__ = [
    "METHODS",
    "Hook",
    "MethodSpec",
    "OptimizerWrapper",
    "build_hooks",
    "check_options",
    "frozen_bn_stats",
    "get_method",
    "list_methods",
    "register_method",
]

# Each imported module registers its methods with @register_method: one line per module.
from qatlab.methods import (  # noqa: E402, F401  (one module per line)
    oscillation,  # track, dampen, freeze
    oscreg,  # oscreg
    saq,  # saq
    talr,  # talr
)
