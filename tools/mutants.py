"""mutmut (3.8.1, pinned) with decorated functions mutated too; ``make mutants`` runs it.

mutmut 3.8 skips every function that has a decorator other than a lone ``@staticmethod`` or
``@classmethod`` (``mutmut/mutation/file_mutation.py``: copying a decorated function could
register it twice, and a mutated decorator argument could break the import). In qatlab's
formula modules that left the ``@torch.no_grad()`` functions (the transition count, the
oscillation tracker, freezing, SAQ's perturbation, LogAdam's step, the quantizer's
initialisation), the ``@contextmanager`` functions, the ``@property`` statistics and the
``@register_method``/``@register_measure`` factories unmutated.

This script patches mutmut at start-up, then runs mutmut's own command line (any command:
``run``, ``results``, ``show NAME``...). With the patch, a function whose decorators are all of
a checked kind (:data:`KINDS`) is mutated like any other (its decorator lines still are not),
and of the code mutmut generates for it

- the trampoline keeps the function's decorators (as mutmut does), so ``@torch.no_grad()`` wraps
  the trampoline and the copy it calls runs inside it, ``@contextmanager`` wraps the generator
  trampoline that ``yield from``s the copy's generator, ``@property`` makes the trampoline the
  getter and a registry decorator registers the trampoline, once;
- the ``_orig`` copy and the mutant copies are plain functions without the decorators, except a
  cache (``@functools.cache``), which moves from the trampoline to each copy: a cache around the
  trampoline, filled with original results in the process the workers fork from, would hide the
  mutant in each worker.

mutmut's own handling of a lone ``@staticmethod``/``@classmethod`` is left as it is. A function
with any other decorator (a ``.setter``, ``@overload``, ``torch.jit``...) is still skipped: its
generated copies would clash by name or be compiled. The workers fork (``process_isolation =
"fork"``, and mutmut generates the mutants in a fork pool), so the patch made here holds for
all of them.

It also sets ``QATLAB_FUSED_KERNELS=0`` (unless set): mutmut mutates Python, not the C++ kernels
of ``qatlab/quant/fused.cpp``, and with them off every per-tensor fake quantization in the
definition tests runs through ``_FakeQuant``, whose formulas are the ones mutated
(``tests/test_fused.py`` pins the C++ kernels to ``_FakeQuant``).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python tools/mutants.py run --max-children 2
    .venv/bin/python tools/mutants.py results --all true
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence

import libcst as cst
from libcst.metadata import PositionProvider
from mutmut.mutation import file_mutation as fm

#: Decorators (dotted name, call arguments ignored) checked to work on the trampoline, with
#: the copies undecorated: every kind that occurs in the mutated modules.
KINDS = frozenset(
    {
        "torch.no_grad",
        "contextlib.contextmanager",
        "contextmanager",
        "property",
        "register_method",
        "register_measure",
        "staticmethod",  # with another decorator; alone, mutmut handles it
        "classmethod",
    }
)
#: Caches: on each copy instead of the trampoline.
CACHES = frozenset({"functools.cache", "functools.lru_cache", "cache", "lru_cache"})
#: mutmut's own case, left as it is: a lone one of these.
NATIVE = frozenset({"staticmethod", "classmethod"})


def decorator_name(decorator: cst.Decorator) -> str:
    """The dotted name of a decorator, without its call: ``@torch.no_grad()`` -> torch.no_grad."""
    node = decorator.decorator
    if isinstance(node, cst.Call):
        node = node.func
    parts = []
    while isinstance(node, cst.Attribute):
        parts.append(node.attr.value)
        node = node.value
    if not isinstance(node, cst.Name):
        return ""
    parts.append(node.value)
    return ".".join(reversed(parts))


def _native(decorators: Sequence[cst.Decorator]) -> bool:
    return len(decorators) == 1 and isinstance(decorators[0].decorator, cst.Name) and (
        decorators[0].decorator.value in NATIVE
    )


def mutable(function: cst.FunctionDef) -> bool:
    """Whether the patched mutmut mutates a decorated ``function``: every decorator is of a
    checked kind or a cache (a lone staticmethod/classmethod: mutmut's own case)."""
    names = [decorator_name(d) for d in function.decorators]
    return all(n in KINDS or n in CACHES for n in names)


_skip = fm.MutationVisitor._skip_node_and_children
_arrange = fm.function_trampoline_arrangement


def _skip_node_and_children(self: fm.MutationVisitor, node: cst.CSTNode) -> bool:
    """mutmut's check, except that a decorated function of a checked kind is visited (its
    decorator nodes are still skipped by mutmut's own ``cst.Decorator`` rule)."""
    skip = _skip(self, node)
    if not (skip and isinstance(node, cst.FunctionDef) and node.decorators and mutable(node)):
        return skip
    # the reasons other than decorators mutmut skips a function for, in its order
    position = self.get_metadata(PositionProvider, node, None)
    if position and position.start.line in self._ignored_node_lines:
        return True
    if node in self._enum_creation_hooks or node.name.value in fm.NEVER_MUTATE_FUNCTION_NAMES:
        return True
    return False


def _function_trampoline_arrangement(
    function: cst.FunctionDef, mutants: Iterable[fm.Mutation], class_name: str | None
) -> tuple:
    """mutmut's arrangement; for a decorated function (not its lone staticmethod/classmethod
    case) the copies lose the decorators and a cache moves from the trampoline to the copies."""
    declarations, nodes, assignments, names = _arrange(function, mutants, class_name)
    if not function.decorators or _native(function.decorators):
        return declarations, nodes, assignments, names
    caches = [d for d in function.decorators if decorator_name(d) in CACHES]
    trampoline = nodes[0].with_changes(
        decorators=[d for d in nodes[0].decorators if not any(d is c for c in caches)]
    )
    copies = [n.with_changes(decorators=caches) for n in nodes[1:]]
    return declarations, [trampoline, *copies], assignments, names


#: (owner, attribute, replacement): what :func:`patch` sets.
PATCHES = (
    (fm.MutationVisitor, "_skip_node_and_children", _skip_node_and_children),
    (fm, "function_trampoline_arrangement", _function_trampoline_arrangement),
)


def patch() -> None:
    """Make mutmut (in this process and the ones it forks) mutate decorated functions."""
    for owner, name, replacement in PATCHES:
        setattr(owner, name, replacement)


def main() -> None:
    """Patch mutmut, then run its command line with this script's arguments."""
    if sys.path and sys.path[0].rstrip("/").endswith("tools"):
        sys.path.pop(0)  # this folder, not the project's modules
    patch()
    os.environ.setdefault("QATLAB_FUSED_KERNELS", "0")  # mutate _FakeQuant, not C++ (above)
    from mutmut.__main__ import cli

    cli(prog_name="mutmut")


if __name__ == "__main__":
    main()
