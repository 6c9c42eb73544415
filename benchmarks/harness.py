"""What every benchmark script shares: memory, timing, provenance and the result file.

* memory: :func:`proc_status` (VmRSS / VmHWM from /proc, and ru_maxrss),
  :func:`peak_rss_mb`, :func:`reset_peak_rss` (resets the high-water mark);
* timing: :func:`median`, :func:`timed` (repeated calls of one function) and
  :func:`interleaved` (several functions called round-robin, so drift on a busy machine
  hits them alike); :func:`compile_timed`, :func:`xla_memory`, :func:`xla_flops` for a
  jitted function's executable; :func:`record_throughput`;
* provenance: :func:`host_info` (no JAX), :func:`device_info` (imports JAX),
  :func:`library_fingerprint` (git commit, dirty flag, hash of the library sources);
* :func:`write_result`: the JSON, with the command line that made it;
* :func:`readme_section`: a generated section of README.md (between marker comments).

Scripts are run as ``python benchmarks/<name>.py``, so ``import harness`` resolves here.
Importing this module puts the repository root first on ``sys.path`` (the checkout's
``trackstar_jax`` and ``tests`` fixtures, not an installed copy), and never imports JAX:
a parent process that only orchestrates children stays small.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, 'results')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------- memory


def proc_status() -> dict[str, float]:
    """This process's memory in MiB: 'vmrss_mb', 'vmhwm_mb' (/proc/self/status), 'ru_maxrss_mb'.

    VmHWM is the high-water mark of this process's own address space. ru_maxrss
    (getrusage) is kept for reference: Linux carries it over fork + exec, so a fresh child
    reports at least its parent's RSS at the fork.
    """
    out = {'ru_maxrss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    with contextlib.suppress(OSError), open('/proc/self/status') as f:
        for line in f:
            if line.startswith(('VmHWM:', 'VmRSS:')):
                out[line.split(':')[0].lower() + '_mb'] = int(line.split()[1]) / 1024.0
    return out


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB: VmHWM, or ru_maxrss where /proc has none."""
    status = proc_status()
    return status.get('vmhwm_mb', status['ru_maxrss_mb'])


def reset_peak_rss() -> bool:
    """Resets VmHWM (and with it ru_maxrss) to the current RSS; False if not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- timing


def median(xs: Iterable[float]) -> float:
    """The median as a float."""
    return float(statistics.median(list(xs)))


def block_until_ready(x: Any) -> Any:
    """``jax.block_until_ready(x)`` if JAX is already imported, else ``x``."""
    jax = sys.modules.get('jax')
    return jax.block_until_ready(x) if jax is not None else x


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """(median seconds, all seconds, last result) of ``repeats`` calls of ``fn``.

    Each call's result is waited for (:func:`block_until_ready`) inside its timing.
    """
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return median(times), times, out


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each fn per repetition, the fns called round-robin (results waited for).

    Repetition i of every fn runs between repetitions i - 1 and i + 1 of the others, so
    ratios of per-repetition times (or of medians) compare numbers taken side by side.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return times


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
    """(compiled executable, seconds to lower + compile) of a jitted function."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def xla_memory(compiled: Any) -> dict[str, int]:
    """A compiled executable's memory_analysis(), in bytes; total = temp + argument + output."""
    m = compiled.memory_analysis()
    out = {
        'temp_bytes': int(m.temp_size_in_bytes),
        'argument_bytes': int(m.argument_size_in_bytes),
        'output_bytes': int(m.output_size_in_bytes),
        'alias_bytes': int(m.alias_size_in_bytes),
    }
    out['total_bytes'] = out['temp_bytes'] + out['argument_bytes'] + out['output_bytes']
    out['total_minus_alias_bytes'] = out['total_bytes'] - out['alias_bytes']
    return out


def xla_flops(compiled: Any) -> float | None:
    """XLA's flop estimate of a compiled executable (None if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (backend-dependent)
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get('flops')
    return float(flops) if flops is not None else None


def record_throughput(
    methods: dict[str, dict], times: Mapping[str, list[float]], batch: int, seq_len: int
) -> None:
    """Adds median seconds, all seconds, examples/s and tokens/s to each method's record."""
    for name, ts in times.items():
        med = median(ts)
        methods.setdefault(name, {}).update(
            seconds=med,
            all_seconds=list(ts),
            examples_s=batch / med,
            tokens_s=batch * seq_len / med,
        )


# ----------------------------------------------------------------------------- provenance


def host_info() -> dict[str, Any]:
    """CPU model, CPU count and platform (never imports JAX)."""
    cpu = ''
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    return {'cpu': cpu, 'cpu_count': os.cpu_count(), 'platform': platform.platform()}


def device_info() -> dict[str, Any]:
    """JAX version, backend and devices, with :func:`host_info` (imports JAX)."""
    import jax

    devs = jax.devices()
    return {
        'jax_version': jax.__version__,
        'backend': jax.default_backend(),
        'device_kind': devs[0].device_kind,
        'devices': [str(d) for d in devs],
        'summary': (
            f'{len(devs)} x {devs[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs'
        ),
        'host': host_info(),
    }


def library_fingerprint(paths: Sequence[str]) -> dict[str, Any]:
    """A hash of the library sources a benchmark runs, and the repo's commit and dirty state.

    Args:
      paths: files or directories under ``trackstar_jax/`` (directories: every .py file;
        '.' is the whole library). A path that does not exist is an error: it would hash
        nothing and never read as dirty.

    Returns:
      {'paths', 'source_sha256', 'git_commit', 'library_dirty'} (the git keys only where
      git answers). Record it at the start and end of a run (and in every timing child),
      so results taken while that code was being edited are flagged, not silently mixed.
    """
    import importlib.util

    spec = importlib.util.find_spec('trackstar_jax')
    if spec is None or spec.origin is None:
        return {}
    root = os.path.dirname(spec.origin)
    digest = hashlib.sha256()
    for rel in paths:
        top = os.path.join(root, rel)
        if not os.path.exists(top):
            raise ValueError(f'{rel!r} is not a file or directory under {root}.')
        files = [top] if os.path.isfile(top) else []
        for dirpath, dirnames, names in os.walk(top):
            dirnames.sort()
            files += [os.path.join(dirpath, f) for f in sorted(names) if f.endswith('.py')]
        for path in files:
            digest.update(os.path.relpath(path, root).encode())
            with open(path, 'rb') as f:
                digest.update(f.read())
    out: dict[str, Any] = {'paths': list(paths), 'source_sha256': digest.hexdigest()[:16]}
    repo = os.path.dirname(root)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ['git', '-C', repo]
        out['git_commit'] = subprocess.run(
            [*git, 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            [*git, 'status', '--porcelain', '--', *(f'trackstar_jax/{p}' for p in paths)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        out['library_dirty'] = bool(status.strip())
    return out


def changed_during_run(*fingerprints: Mapping[str, Any]) -> bool:
    """Whether fingerprints taken over one run disagree on the library sources."""
    return len({f.get('source_sha256') for f in fingerprints}) > 1


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran this script, as typed from the repository root.

    Args:
      argv: the arguments after the script (default: ``sys.argv[1:]``).
    """
    script = os.path.abspath(sys.argv[0])
    with contextlib.suppress(ValueError):
        if os.path.commonpath([script, ROOT]) == ROOT:
            script = os.path.relpath(script, ROOT)
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(['python', script, *args])


def timestamp() -> str:
    """Now, UTC, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def write_result(path: str, result: Mapping[str, Any], argv: Sequence[str] | None = None) -> str:
    """Writes ``result`` as JSON at ``path`` (atomically), led by its command and time.

    ``command`` (see :func:`command_line`) and ``timestamp`` are added unless ``result``
    already has them. Returns ``path``.
    """
    out = {'command': command_line(argv), 'timestamp': timestamp(), **result}
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(out, f, indent=1)
        f.write('\n')
    os.replace(tmp, path)
    return path


def readme_from_result(path: str, write_readme: Callable[[dict], Any]) -> None:
    """Regenerates a benchmark's README section from its stored results JSON at ``path``."""
    with open(path) as f:
        write_readme(json.load(f))


def publish(
    path: str, result: Mapping[str, Any], *, committed: bool, write_readme: Callable[[dict], Any]
) -> str:
    """Writes ``result`` at ``path`` (:func:`write_result`) and prints where.

    A ``committed`` result (the benchmark's full run at its default path, not a quick or
    redirected one) also regenerates its README section, from the file as written, so the
    README shows exactly what the JSON holds, command and timestamp included.
    """
    write_result(path, result)
    if committed:
        readme_from_result(path, write_readme)
    print(f'results: {path}')
    return path


def study_main(
    argv: Sequence[str] | None,
    description: str,
    out: str,
    run: Callable[[Any], Mapping[str, Any]],
    write_readme: Callable[[dict], Any],
    *,
    workdir: str = '/tmp/lds_bench',
    quick_help: str | None = "lds.py --quick's sizes",
    add_arguments: Callable[[Any], None] | None = None,
    prepare: Callable[[Any, Any], None] | None = None,
) -> Mapping[str, Any] | None:
    """The command line of a benchmark that works in a directory and publishes one JSON.

    Flags: --workdir (default ``workdir``), --quick (unless ``quick_help`` is None), --out,
    --readme_only, and whatever ``add_arguments(parser)`` adds. After parsing,
    ``prepare(args, parser)`` may check the flags (``parser.error``) and set --quick's
    sizes. A full run's JSON goes to ``out`` and regenerates the README section
    (:func:`publish`); a quick run's goes into the workdir as ``<name>_quick.json`` and
    --out's where it says, neither touching the committed results.

    Returns:
      The result (None with --readme_only).
    """
    import argparse

    parser = argparse.ArgumentParser(description=description.split('\n\n')[0])
    parser.add_argument('--workdir', default=workdir)
    if quick_help is not None:
        parser.add_argument('--quick', action='store_true', help=quick_help)
    parser.add_argument('--out', default=None)
    parser.add_argument(
        '--readme_only', action='store_true', help='rewrite the README section from the JSON'
    )
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.readme_only:
        readme_from_result(out, write_readme)
        return None
    if prepare is not None:
        prepare(args, parser)
    quick = getattr(args, 'quick', False)
    res = run(args)
    quick_name = os.path.basename(out).replace('.json', '_quick.json')
    path = args.out or (os.path.join(args.workdir, quick_name) if quick else out)
    publish(path, res, committed=not (args.out or quick), write_readme=write_readme)
    return res


def query_intervals(per_query: Mapping[str, Any]) -> dict[str, Any]:
    """{metric: mean, metric + '_ci': [low, high]}: each per-query array's mean and 95%
    bootstrap interval over its finite entries (a query whose metric is undefined, e.g.
    a constant ranking's Spearman, is left out, not counted as 0)."""
    import numpy as np

    from trackstar_jax.eval import stats

    row: dict[str, Any] = {}
    for key, v in per_query.items():
        v = np.asarray(v, float)
        mean, lo, hi = stats.bootstrap_ci(v[np.isfinite(v)])
        row[key], row[key + '_ci'] = mean, [lo, hi]
    return row


def paired_difference(a: Any, b: Any) -> dict[str, float]:
    """Paired bootstrap of a - b (``stats.paired_bootstrap``) over the queries where both
    are finite."""
    import numpy as np

    from trackstar_jax.eval import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    return stats.paired_bootstrap(a[ok], b[ok])


def interval(value: float, low: float, high: float, digits: int = 3, signed: bool = False) -> str:
    """'0.123 [0.100, 0.150]': a mean and its interval for a README table."""
    f = f'{{:{"+" if signed else ""}.{digits}f}}'
    return f'{f.format(value)} [{f.format(low)}, {f.format(high)}]'


def row_cell(row: Mapping[str, Any], key: str, digits: int = 3, signed: bool = False) -> str:
    """``row[key]`` with its ``row[key + '_ci']`` interval, or '—' if the row lacks it."""
    if key not in row:
        return '—'
    return interval(row[key], *row[key + '_ci'], digits=digits, signed=signed)


def paired_cell(diffs: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """A paired difference ``{'diff', 'low', 'high'}`` at ``diffs[key]``, signed, or '—'."""
    if key not in diffs:
        return '—'
    d = diffs[key]
    return interval(d['diff'], d['low'], d['high'], digits=digits, signed=True)


README = os.path.join(ROOT, 'README.md')


def readme_section(name: str, body: str, check: bool = False, path: str = README) -> bool:
    """Puts ``body`` between ``<!-- name:begin -->`` and ``<!-- name:end -->`` of README.md.

    With ``check`` nothing is written. Returns whether the file already held ``body``.

    Raises:
      SystemExit: if the file has no such section.
    """
    begin, end = f'<!-- {name}:begin -->', f'<!-- {name}:end -->'
    with open(path) as f:
        text = f.read()
    head, sep, rest = text.partition(begin)
    _, sep2, tail = rest.partition(end)
    if not (sep and sep2):
        raise SystemExit(f'{path} has no {begin} ... {end} section.')
    new = f'{head}{begin}\n{body}\n{end}{tail}'
    if new == text or check:
        return new == text
    with open(path, 'w') as f:
        f.write(new)
    return False
