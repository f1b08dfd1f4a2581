"""lorastream: merge PEFT adapters into model weights and convert checkpoints by streaming
tensors (PyTorch zip ``.pth``/``.bin``, safetensors, HF sharded folders), never holding the
model in memory.

The functions here run the ``lorastream`` command line's own code inside this process (a
Rust extension; the GIL is released while it works) and return the report its ``--json``
option prints, as a dict, without the ``"ok"`` and ``"exit_code"`` entries. Every keyword
argument is the command-line flag of the same name (``keep_lora`` is ``--keep-lora``), with
the same defaults, checks and outputs: a merge written here is byte for byte the one the
command writes for the same arguments.

Failures raise :class:`LorastreamError` (``kind``, ``message``, ``file``, ``tensor``, as in
the command's JSON failure object); outputs appear whole or not at all. Ctrl-C
(KeyboardInterrupt) stops a run, removes its unfinished output and is then raised.

:func:`run` runs a recipe's jobs as child processes, as ``lorastream run`` does: each job
is this package's ``lorastream`` command, started with this interpreter.

The ``lorastream`` command installed with the package is the same command line.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import _lorastream

__version__: str = _lorastream.__version__

#: Every ``LorastreamError.kind``, with what it means.
KINDS: Dict[str, str] = dict(_lorastream.KINDS)

PathLike = Union[str, "os.PathLike[str]"]
#: An adapter: its folder (or a file in it), optionally with its ``--combine`` weight.
Adapter = Union[PathLike, Tuple[PathLike, float]]
#: ``base=``: one path, or ``{component: path}``.
Bases = Union[PathLike, Mapping[str, PathLike]]
#: ``lora=``: one adapter, a list merged in order, or ``{component: adapter or list}``.
Loras = Union[Adapter, Sequence[Adapter], Mapping[str, Union[Adapter, Sequence[Adapter]]]]
#: ``rename=``: ``"REGEX=REPLACEMENT"`` strings or ``(regex, replacement)`` pairs.
Renames = Iterable[Union[str, Tuple[str, str]]]
#: ``part=``: ``"K/N"``, ``"auto"`` or ``(K, N)``.
Part = Union[str, Tuple[int, int]]

__all__ = [
    "KINDS",
    "LorastreamError",
    "__version__",
    "convert",
    "diff",
    "inspect",
    "main",
    "merge",
    "run",
    "stitch",
    "verify",
]


class LorastreamError(Exception):
    """A run that failed, as the command's ``--json`` failure object reports it.

    Attributes:
        kind: one of :data:`KINDS` (``"usage"``, ``"not_found"``, ``"io"``, ``"input"``,
            ``"plan"``, ``"device"``, ``"internal"``, ``"interrupted"``).
        message: the error line the command prints (also ``str(err)``).
        file: the file the error concerns, or None.
        tensor: the tensor the error concerns, or None.
        exit_code: the command's exit status for it (2 usage; verify/diff: 2 always).
        report: for :func:`run`, a batch in which a job failed: what it would have
            returned (the summary and every job's line); otherwise None.
    """

    def __init__(
        self,
        message: str,
        kind: str = "internal",
        file: Optional[str] = None,
        tensor: Optional[str] = None,
        exit_code: int = 1,
        report: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.file = file
        self.tensor = tensor
        self.exit_code = exit_code
        self.report = report

    def __reduce__(self):  # keeps the attributes through pickling (multiprocessing)
        return (
            type(self),
            (self.message, self.kind, self.file, self.tensor, self.exit_code, self.report),
        )

    def __repr__(self) -> str:
        return (
            f"LorastreamError({self.message!r}, kind={self.kind!r}, file={self.file!r}, "
            f"tensor={self.tensor!r})"
        )


def _path(p: PathLike) -> str:
    # os.fsdecode keeps undecodable bytes (surrogateescape); the extension encodes them back.
    return os.fsdecode(os.fspath(p))


def _job_program() -> Tuple[str, List[str]]:
    # What runs a recipe's jobs: this interpreter running this very package (the one
    # imported here, whatever sys.path a job's folder would give: its parent goes first),
    # as the `lorastream` command. The process's own executable is the interpreter, so
    # the runner cannot start itself as the command line does.
    where = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        f"import sys; sys.path.insert(0, {where!r}); "
        "from lorastream import main; sys.exit(main())"
    )
    return sys.executable, ["-c", code]


def _failure(obj: Dict[str, Any], text: str) -> LorastreamError:
    err = obj.get("error", {})
    return LorastreamError(
        err.get("message", text),
        kind=err.get("kind", "internal"),
        file=err.get("file"),
        tensor=err.get("tensor"),
        exit_code=obj.get("exit_code", 1),
    )


def _args(command: str, flags: List[str], positionals: Sequence[PathLike]) -> List[str]:
    # Flags as --name=value, positionals after "--": no value (a path starting with '-')
    # can be read as a flag.
    return ["lorastream", command, *flags, "--json", "--", *map(_path, positionals)]


def _run(command: str, flags: List[str], positionals: Sequence[PathLike] = ()) -> Dict[str, Any]:
    ok, text = _lorastream.run(_args(command, flags, positionals))
    obj = json.loads(text)
    if not ok:
        raise _failure(obj, text)
    obj.pop("ok", None)
    obj.pop("exit_code", None)
    return obj


def _is_adapter_pair(x: Any) -> bool:
    return (
        isinstance(x, tuple)
        and len(x) == 2
        and isinstance(x[1], (int, float))
        and not isinstance(x[1], bool)
    )


def _adapter_spec(x: Adapter) -> str:
    if _is_adapter_pair(x):
        path, weight = x  # type: ignore[misc]
        return f"{_path(path)}:{float(weight)!r}"
    return _path(x)  # type: ignore[arg-type]


def _adapters(x: Union[Adapter, Sequence[Adapter]]) -> List[str]:
    if isinstance(x, (str, os.PathLike)) or _is_adapter_pair(x):
        return [_adapter_spec(x)]  # type: ignore[arg-type]
    return [_adapter_spec(a) for a in x]  # type: ignore[union-attr]


def _component_flags(base: Optional[Bases], lora: Optional[Loras]) -> List[str]:
    # The command's --base [NAME=]PATH and --lora [NAME=]DIR[:WEIGHT]. Components are
    # ordered as first named: base's, then lora's.
    flags: List[str] = []
    if base is not None:
        if isinstance(base, Mapping):
            flags += [f"--base={name}={_path(p)}" for name, p in base.items()]
        else:
            flags.append(f"--base={_path(base)}")
    if lora is not None:
        if isinstance(lora, Mapping):
            for name, adapters in lora.items():
                flags += [f"--lora={name}={a}" for a in _adapters(adapters)]
        else:
            flags += [f"--lora={a}" for a in _adapters(lora)]
    return flags


def _repeat(flag: str, values: Iterable[str]) -> List[str]:
    if isinstance(values, str):
        values = [values]
    return [f"--{flag}={v}" for v in values]


def _renames(rename: Renames) -> List[str]:
    # A bare string is one rule; otherwise each item is a rule or a (regex, replacement) pair.
    rules = [rename] if isinstance(rename, str) else list(rename)
    return [f"--rename={r if isinstance(r, str) else f'{r[0]}={r[1]}'}" for r in rules]


def _flag(name: str, on: bool) -> List[str]:
    return [f"--{name}"] if on else []


def _value(name: str, value: Any) -> List[str]:
    return [] if value is None else [f"--{name}={value}"]


def _part(part: Optional[Part]) -> List[str]:
    if part is None:
        return []
    if isinstance(part, str):
        return [f"--part={part}"]
    if (
        isinstance(part, tuple)
        and len(part) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in part)
    ):
        return [f"--part={part[0]}/{part[1]}"]
    raise TypeError(f"part must be 'K/N', 'auto' or a (K, N) pair of ints, not {part!r}")


def _output_flags(a: Mapping[str, Any]) -> List[str]:
    """The output flags (``merge`` and ``convert``) from the caller's arguments ``a``."""
    return [
        f"--dtype={a['dtype']}",
        *_renames(a["rename"]),
        *_repeat("exclude", a["exclude"]),
        *_value("shard-size", a["shard_size"]),
        *_flag("buffered-io", a["buffered_io"]),
        *_flag("overwrite", a["overwrite"]),
        *_flag("no-copy-files", a["no_copy_files"]),
        *_flag("verbose", a["verbose"]),
        *_part(a["part"]),
        *_value("gguf-type", a["gguf_type"]),
        *_value("requantize", a["requantize"]),
        # --quiet: no bar and no notes; --progress: the bar (on a terminal) despite --json.
        *(["--quiet"] if a["quiet"] else _flag("progress", a["progress"])),
    ]


def _merge_flags(a: Mapping[str, Any]) -> List[str]:
    """The merge flags (``merge`` and ``verify``) from the caller's arguments ``a``."""
    density, module_order = a["density"], a["module_order"]
    return [
        *_component_flags(a["base"], a["lora"]),
        *_flag("keep-lora", a["keep_lora"]),
        *_value("threads", a["threads"]),
        f"--device={a['device']}",
        *_repeat("fan-in-fan-out", a["fan_in_fan_out"]),
        *_repeat("no-fan-in-fan-out", a["no_fan_in_fan_out"]),
        *_value("combine", a["combine"]),
        *_value("density", None if density is None else repr(float(density))),
        f"--majority-sign-method={a['majority_sign_method']}",
        *_value("seed", a["seed"]),
        *_value("module-order", None if module_order is None else _path(module_order)),
    ]


def merge(
    out: PathLike,
    base: Optional[Bases] = None,
    lora: Optional[Loras] = None,
    *,
    keep_lora: bool = False,
    dtype: str = "keep",
    rename: Renames = (),
    exclude: Iterable[str] = (),
    expect_keys_from: Optional[PathLike] = None,
    allow_missing_keys: bool = False,
    allow_non_finite: bool = False,
    threads: Optional[int] = None,
    device: str = "auto",
    shard_size: Union[int, str, None] = None,
    dry_run: bool = False,
    combine: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
    seed: Optional[int] = None,
    module_order: Optional[PathLike] = None,
    fan_in_fan_out: Iterable[str] = (),
    no_fan_in_fan_out: Iterable[str] = (),
    buffered_io: bool = False,
    overwrite: bool = False,
    no_copy_files: bool = False,
    progress: bool = True,
    quiet: bool = False,
    verbose: bool = False,
    part: Optional[Part] = None,
    gguf_type: Optional[str] = None,
    requantize: Optional[str] = None,
) -> Dict[str, Any]:
    """Merges PEFT adapters into base weights (or keeps them unmerged) and writes ``out``:
    ``lorastream merge``.

    Args:
        out: ``.pth``/``.pt``/``.bin``, ``.safetensors``, or a folder ending in ``/``
            (HF sharded safetensors; give a folder as a ``str``: a ``pathlib.Path`` drops
            the trailing ``/``).
        base: the base weights: a path (file, ``*.index.json`` or HF folder), or
            ``{component: path}`` (``--base NAME=PATH``).
        lora: a PEFT adapter folder; a list of them (merged in order, or with ``combine``
            as one weighted combination: give ``(path, weight)`` pairs); or
            ``{component: adapter or list}`` (``--lora NAME=DIR[:WEIGHT]``). Components
            appear in the output in the order first named: ``base``'s, then ``lora``'s.
        keep_lora: write the adapters unmerged, keyed as ``PeftModel.state_dict()``.
        dtype: ``"keep"``, ``"bf16"``, ``"f16"`` or ``"f32"``.
        rename: ``"REGEX=REPLACEMENT"`` rules (or ``(regex, replacement)`` pairs), in order.
        exclude: regexes of final keys to leave out.
        expect_keys_from: fail unless the output keys are exactly this reference's
            (a checkpoint, or a ``.txt`` with one key per line).
        threads: CPU worker threads (default: all cores).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        shard_size: largest shard of a folder output, bytes or ``"5GB"``-style.
        dry_run: run every check, write nothing; the report lists the plan.
        seed: ``dare_*`` combinations: the ``torch.manual_seed(N)`` run just before
            PEFT's ``add_weighted_adapter`` (``--seed``).
        module_order: ``dare_*``: a text file of the model's module names in
            ``model.named_modules()`` order (``--module-order``).
        progress: draw a progress bar on stderr when it is a terminal.
        quiet: print nothing (no bar, no notes; notes stay in the report).
        verbose: also print one line per tensor on stderr as it is written.
        part: write only part K of N of a folder output (``"K/N"``, ``(K, N)``, or
            ``"auto"`` from a Slurm job array or Kubernetes Indexed Job); :func:`stitch`
            joins the N parts into exactly the single run's folder (``--part``).
        gguf_type: a ``.gguf`` output: the ggml type of the 2-D tensors written
            (``"F16"``, ``"BF16"``, ``"Q8_0"``, ``"Q4_0"``, …; ``--gguf-type``); other
            tensors keep their stored type.
        requantize: ``"fp8-block"``: write the merged weights of an FP8 block-scaled base
            in the base's own layout (``weight`` + ``weight_scale_inv``), as vLLM and
            SGLang load it (``--requantize``).

    The other arguments are the command's flags of the same name (``lorastream merge
    --help``).

    Returns:
        The ``--json`` report: ``output``, ``format``, ``dry_run``, ``device``, ``tensors``,
        ``merged``, ``bytes``, ``seconds``, ``peak_rss_bytes``, ``components``, ``notes``
        (and ``plan`` for a dry run).

    Raises:
        LorastreamError: the run failed; nothing was written.
    """
    args = locals()  # every argument, by name, for the flag helpers
    flags = [
        f"--out={_path(out)}",
        *_merge_flags(args),
        *_value("expect-keys-from", None if expect_keys_from is None else _path(expect_keys_from)),
        *_flag("allow-missing-keys", allow_missing_keys),
        *_flag("allow-non-finite", allow_non_finite),
        *_flag("dry-run", dry_run),
        *_output_flags(args),
    ]
    return _run("merge", flags)


def convert(
    input: PathLike,
    output: PathLike,
    *,
    dtype: str = "keep",
    rename: Renames = (),
    exclude: Iterable[str] = (),
    shard_size: Union[int, str, None] = None,
    allow_empty: bool = False,
    buffered_io: bool = False,
    overwrite: bool = False,
    no_copy_files: bool = False,
    progress: bool = True,
    quiet: bool = False,
    verbose: bool = False,
    part: Optional[Part] = None,
    gguf_type: Optional[str] = None,
    requantize: Optional[str] = None,
) -> Dict[str, Any]:
    """Rewrites a checkpoint in another format, dtype or naming: ``lorastream convert``.

    The output format follows ``output``'s name (``.pth``/``.bin``, ``.safetensors``, or a
    folder ending in ``/``). Arguments as for :func:`merge`; ``allow_empty`` writes an
    output even when the input holds no tensors.

    Returns:
        The ``--json`` report: ``output``, ``format``, ``tensors``, ``merged`` (0),
        ``bytes``, ``seconds``, ``peak_rss_bytes``, ``notes``.

    Raises:
        LorastreamError: the run failed; nothing was written.
    """
    args = locals()  # every argument, by name, for the flag helpers
    flags = [
        *_flag("allow-empty", allow_empty),
        *_output_flags(args),
    ]
    return _run("convert", flags, [input, output])


def inspect(path: PathLike) -> Dict[str, Any]:
    """Lists every tensor of a checkpoint (and describes a PEFT adapter folder):
    ``lorastream inspect --json``.

    Raises:
        LorastreamError: the checkpoint cannot be read.
    """
    return _run("inspect", [], [path])


def verify(
    out: PathLike,
    base: Optional[Bases] = None,
    lora: Optional[Loras] = None,
    *,
    keep_lora: bool = False,
    dtype: str = "keep",
    rename: Renames = (),
    exclude: Iterable[str] = (),
    threads: Optional[int] = None,
    device: str = "auto",
    combine: Optional[str] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
    seed: Optional[int] = None,
    module_order: Optional[PathLike] = None,
    fan_in_fan_out: Iterable[str] = (),
    no_fan_in_fan_out: Iterable[str] = (),
    buffered_io: bool = False,
    exact: bool = False,
    max_ulp: Optional[int] = None,
    sample: Optional[int] = None,
) -> Dict[str, Any]:
    """Checks an existing merge output against a recomputed merge, writing nothing:
    ``lorastream verify``. Takes the merge's arguments (see :func:`merge`).

    Args:
        exact: compare bit for bit instead of within the merge's tolerance.
        max_ulp: accept at most this many ulp in every float element.
        sample: check only this many rows of every tensor.

    Returns:
        The ``--json`` report; ``report["matches"]`` says whether ``out`` matches.

    Raises:
        LorastreamError: the check could not be made (``exit_code`` 2).
    """
    args = locals()  # every argument, by name, for the flag helpers
    flags = [
        *_merge_flags(args),
        f"--dtype={dtype}",
        *_renames(rename),
        *_repeat("exclude", exclude),
        *_flag("buffered-io", buffered_io),
        *_flag("exact", exact),
        *_value("max-ulp", max_ulp),
        *_value("sample", sample),
    ]
    return _run("verify", flags, [out])


def diff(a: PathLike, b: PathLike, *, exact: bool = False) -> Dict[str, Any]:
    """Compares two checkpoints tensor by tensor: ``lorastream diff --json``.

    Returns:
        The report; ``report["identical"]`` says whether they are.

    Raises:
        LorastreamError: an input cannot be read (``exit_code`` 2).
    """
    return _run("diff", _flag("exact", exact), [a, b])


def stitch(dir: PathLike) -> Dict[str, Any]:
    """Joins the parts of a partitioned folder output (``part="K/N"`` runs of
    :func:`merge` or :func:`convert` into ``dir``) into the finished folder, byte for byte
    what a single run writes: ``lorastream stitch``.

    Returns:
        The ``--json`` report: ``output``, ``parts``, ``shards``, ``tensors``, ``bytes``,
        ``seconds``.

    Raises:
        LorastreamError: parts are missing or inconsistent (the message names them);
            nothing was changed.
    """
    return _run("stitch", [], [dir])


def _vars(vars: Union[Mapping[str, Any], Iterable[str], None]) -> List[str]:
    if vars is None:
        return []
    if isinstance(vars, Mapping):
        return [f"--var={k}={v}" for k, v in vars.items()]
    return _repeat("var", vars)


def run(
    recipe: PathLike,
    jobs: int = 1,
    keep_going: bool = False,
    dry_run: bool = False,
    force: bool = False,
    vars: Union[Mapping[str, Any], Iterable[str], None] = None,
) -> Dict[str, Any]:
    """Runs a recipe's jobs (a TOML file of merge/convert jobs): ``lorastream run``.

    Each job is a child process (this interpreter running this package's ``lorastream``
    command) in the recipe's folder; jobs already complete with the same inputs and
    options are skipped unless ``force``. Ctrl-C (KeyboardInterrupt) sends SIGINT to the
    running jobs (each removes its unfinished output), starts no other and is raised once
    they have stopped.

    Args:
        jobs: jobs at a time (``--jobs``).
        keep_going: after a failure, start the remaining jobs anyway.
        dry_run: say what would run and what would be skipped; run nothing.
        force: run every job, complete or not.
        vars: the recipe's ``${NAME}`` values: ``{name: value}`` or ``"NAME=VALUE"``
            strings (``--var``).

    Returns:
        The summary line of ``lorastream run --json`` (``recipe``, ``succeeded``,
        ``skipped``, ``failed``, ``not_run``, ``failed_jobs``, ``not_run_jobs``,
        ``seconds``; a dry run: ``dry_run``, ``would_run``, ``would_skip``) without
        ``ok``/``exit_code``, where ``jobs`` is the list of the per-job JSON lines (each
        with ``job``, ``index``, ``command``, ``status``, ``exit_code``, ``report``) in
        the order they finished, and ``job_count`` is the recipe's number of jobs.

    Raises:
        LorastreamError: the recipe cannot be read or is invalid (no job ran), or, as the
            command exits 1 then, a job failed or was not run: then ``kind``, ``file``
            and ``tensor`` are the first failed job's, and ``report`` is what this
            function would have returned (every job's line included).
    """
    flags = [
        f"--jobs={int(jobs)}",
        *_flag("keep-going", keep_going),
        *_flag("dry-run", dry_run),
        *_flag("force", force),
        *_vars(vars),
    ]
    ok, text = _lorastream.run(_args("run", flags, [recipe]), _job_program())
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    summary = lines[-1] if lines else {}
    if not ok and (len(lines) <= 1 and "error" in summary):
        # Nothing ran: the recipe or the arguments were refused.
        raise _failure(summary, text)
    code = summary.pop("exit_code", 1)
    summary.pop("ok", None)
    summary["job_count"] = summary.get("jobs")
    summary["jobs"] = lines[:-1]
    if ok:
        return summary
    failed = [j for j in summary["jobs"] if j.get("status") not in ("ok", "skipped")]
    err = failed[0]["report"].get("error", {}) if failed else {}
    parts = []
    if summary.get("failed"):
        parts.append(f"{summary['failed']} failed ({', '.join(summary.get('failed_jobs', []))})")
    if summary.get("not_run"):
        parts.append(
            f"{summary['not_run']} not run ({', '.join(summary.get('not_run_jobs', []))})"
        )
    message = f"{summary.get('recipe', _path(recipe))}: of {summary['job_count']} jobs, " + (
        ", ".join(parts) or "not all succeeded"
    )
    if failed:
        message += f"; job '{failed[0]['job']}': {err.get('message', 'failed')}"
    raise LorastreamError(
        message,
        kind=err.get("kind", "internal"),
        file=err.get("file"),
        tensor=err.get("tensor"),
        exit_code=code,
        report=summary,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``lorastream`` command: runs ``argv`` (default ``sys.argv[1:]``) exactly as the
    command line does, printing what it prints, and returns its exit code. Like the command,
    it ends the process on Ctrl-C (exit code 130, unfinished output removed)."""
    args = sys.argv[1:] if argv is None else list(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # `lorastream run`: the jobs are this package's command too, not the interpreter alone.
    return _lorastream.main(["lorastream", *args], _job_program())
