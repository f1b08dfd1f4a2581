"""Type stubs of the compiled extension ``lorastream._lorastream`` (see bindings/python).

Use the functions of the ``lorastream`` package; these are its plumbing.
"""

from typing import List, Sequence, Tuple

__version__: str
#: ``(kind, meaning)`` for every error kind.
KINDS: List[Tuple[str, str]]

def run(args: Sequence[str]) -> Tuple[bool, str]:
    """Runs one command (program name first, ``--json`` among the arguments) with the GIL
    released; returns ``(ok, json_text)``. KeyboardInterrupt cancels the run, removes its
    unfinished output and is raised once the run has stopped."""

def main(args: Sequence[str]) -> int:
    """The ``lorastream`` command for ``args`` (program name first): prints what the binary
    prints, returns its exit code; Ctrl-C ends the process (130) as in the binary."""
