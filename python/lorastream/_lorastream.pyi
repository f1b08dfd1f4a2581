"""Type stubs of the compiled extension ``lorastream._lorastream`` (see bindings/python).

Use the functions of the ``lorastream`` package; these are its plumbing.
"""

from typing import List, Optional, Sequence, Tuple

__version__: str
#: ``(kind, meaning)`` for every error kind.
KINDS: List[Tuple[str, str]]

def run(
    args: Sequence[str], program: Optional[Tuple[str, Sequence[str]]] = None
) -> Tuple[bool, str]:
    """Runs one command (program name first, ``--json`` among the arguments) with the GIL
    released; returns ``(ok, json_text)`` (``run``, a recipe: its JSON lines joined by
    newlines; ok when every job was). KeyboardInterrupt cancels the run (a recipe's
    running jobs get SIGINT), removes its unfinished output and is raised once the run
    has stopped. ``program``: ``(executable, arguments before the job's command)`` that
    runs a recipe's jobs (default: this process's executable)."""

def main(args: Sequence[str], program: Optional[Tuple[str, Sequence[str]]] = None) -> int:
    """The ``lorastream`` command for ``args`` (program name first): prints what the binary
    prints, returns its exit code; Ctrl-C ends the process (130) as in the binary.
    ``program``: as for :func:`run`."""
