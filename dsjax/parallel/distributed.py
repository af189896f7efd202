"""Multi-host runs on JAX's own runtime (`jax.distributed`): start-up from the CLI flags, and
agreements that make every process stop with the same `error:` line, never some of them
waiting in a collective for one that has already exited.

  initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # explicit (GPU cluster, tests)
  initialize(auto=True)             # TPU pods, SLURM, Open MPI: jax.distributed detects it all
  run = agree("set-up", build_run, cfg)   # SetupError with one message on every process
  agree("lock", lock.acquire, primary_only=True)  # process 0 acts, every process learns how
  exit_process(1)                   # leaves without waiting for processes that went on

Agreements exchange a few bytes through the coordinator's key-value store (no compiled
collective, a bounded wait). Without initialize() (one process) every helper is a plain call.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable, TypeVar

import jax

DEFAULT_TIMEOUT_S = 300
# How long an agreement waits for the slowest process (it may still be reading a corpus or a
# checkpoint); a process that died is reported sooner, by jax.distributed's heartbeats.
AGREE_TIMEOUT_S = 3600
# How long a failing process waits for the others at jax.distributed's shutdown barrier
# before it leaves anyway (they may be stopping for another reason, or still running).
_EXIT_GRACE_S = 30
# Errors that setting and set-up steps raise with a message for the user.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError)
# jax.distributed.initialize's own timeout, past which it aborts the process with a C++ stack
# trace: initialize() reports the failure itself, this much earlier.
_JAX_TIMEOUT_MARGIN_S = 60

T = TypeVar("T")
_counter = {"agreements": 0}


class SetupError(ValueError):
  """A setting or set-up step failed on at least one process; raised with the same message on
  every process. `kind` names the class of the error where it happened (e.g.
  "FileNotFoundError")."""

  def __init__(self, message: str, kind: str = ""):
    super().__init__(message)
    self.kind = kind


def check_flags(coordinator_address: str | None, num_processes: int | None,
                process_id: int | None, auto: bool = False) -> bool:
  """Validates the multi-host flags (jax.distributed.initialize's argument names); returns
  whether they ask for a multi-process run."""
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  named = [k for k, v in given.items() if v is not None]
  if auto:
    if named:
      raise ValueError(f"--distributed detects the cluster (TPU pod, SLURM, Open MPI) itself; "
                       f"drop {', '.join(named)} or drop --distributed.")
    return True
  if not named:
    return False
  if len(named) < len(given):
    missing = ", ".join(k for k in given if k not in named)
    raise ValueError(f"{', '.join(named)} also needs {missing}: pass --coordinator_address, "
                     "--num_processes and --process_id together (or --distributed on a TPU pod "
                     "or SLURM cluster).")
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator_address={coordinator_address!r} is not HOST:PORT; give "
                     "process 0's address and a free port, e.g. 10.0.0.1:1234.")
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1.")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} is not in [0, --num_processes="
                     f"{num_processes}); number the processes 0 .. {num_processes - 1}.")
  return True


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
  """Joins this process to a multi-process run (jax.distributed.initialize) when the flags ask
  for one; returns whether they did. Call before anything else touches JAX's devices.

  On CPU, collectives between processes use gloo. When not every process has connected after
  `timeout_s`, each prints one `error:` line and exits 1 (jax.distributed itself would abort
  with a C++ stack trace). A --num_processes that differs from the coordinator's count raises
  SetupError on every process.
  """
  if not check_flags(coordinator_address, num_processes, process_id, auto):
    return False
  if timeout_s < 1:
    raise ValueError(f"--initialization_timeout={timeout_s} must be >= 1 second.")
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  where = (f"the coordinator {coordinator_address}" if coordinator_address else
           "the auto-detected coordinator")
  watchdog = _Watchdog(timeout_s, (
      f"jax.distributed.initialize: the processes did not all connect to {where} within "
      f"{timeout_s} s; start every process with the same --coordinator_address and "
      "--num_processes and its own --process_id in [0, num_processes) (or --distributed on a "
      "TPU pod / SLURM cluster), or raise --initialization_timeout."))
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s + _JAX_TIMEOUT_MARGIN_S)
    jax.devices()  # the backend starts here, exchanging every process's devices
  except (ValueError, RuntimeError) as e:  # e.g. --distributed outside a known cluster
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if auto:
      raise SetupError(f"--distributed found no cluster that JAX detects (TPU pod, SLURM, Open "
                       f"MPI): {detail!r}; pass --coordinator_address, --num_processes and "
                       "--process_id instead.") from e
    raise SetupError(f"jax.distributed.initialize failed ({detail}); check "
                     "--coordinator_address, --num_processes and --process_id.") from e
  finally:
    watchdog.cancel()
  agree("process count", _check_count, num_processes, coordinator_address)
  return True


def _check_count(num_processes: int | None, address: str | None) -> None:
  if num_processes is not None and num_processes != jax.process_count():
    raise ValueError(f"--num_processes={num_processes}, but the coordinator {address} counts "
                     f"{jax.process_count()} processes; pass the same --num_processes to "
                     "every process.")


class _Watchdog:
  """Prints `error: message` and ends the process after `seconds` unless cancelled."""

  def __init__(self, seconds: float, message: str):
    self._cancelled = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(seconds, message), daemon=True)
    self._thread.start()

  def _run(self, seconds: float, message: str) -> None:
    if not self._cancelled.wait(seconds):
      _print_error_and_exit(message)

  def cancel(self) -> None:
    self._cancelled.set()


def _print_error_and_exit(message: str) -> None:
  sys.stdout.flush()
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access


def is_primary() -> bool:
  """Whether this is process 0, the one that writes logs, metrics and the workdir lock."""
  return jax.process_index() == 0


def _client():
  """jax.distributed's client of the coordinator's key-value store (the store has no public
  API; Orbax reaches it the same way)."""
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  if distributed.global_state.client is None:
    raise RuntimeError("jax.distributed is not initialized; call initialize() first.")
  return distributed.global_state.client


def all_gather_text(label: str, text: str, timeout_s: int = AGREE_TIMEOUT_S) -> list[str]:
  """Every process's `text`, in process order (every process must call this, in the same
  order as its other agreements). One process: [text]."""
  count = jax.process_count()
  if count == 1:
    return [text]
  _counter["agreements"] += 1
  key = f"dsjax/{_counter['agreements']}/{label}"
  client = _client()
  client.key_value_set(f"{key}/{jax.process_index()}", "=" + text)  # never an empty value
  out = []
  for process in range(count):
    try:
      out.append(client.blocking_key_value_get(f"{key}/{process}", timeout_s * 1000)[1:])
    except Exception as e:  # jax's runtime error type is not public API
      raise SetupError(f"process {process} of {count} did not reach {label!r} within "
                       f"{timeout_s} s; see its output.") from e
  return out


def agree(label: str, fn: Callable[..., T], *args: Any, primary_only: bool = False,
          **kwargs: Any) -> T | None:
  """Runs `fn(*args, **kwargs)` on every process (only process 0 with `primary_only`; the
  others return None) and shares whether it raised: if it did anywhere, every process raises
  SetupError with the message of the lowest such process (prefixed by "process i of n: " when
  not all failed alike), except that an error outside USER_ERRORS (a bug) is re-raised as it
  is where it happened. One process: fn's error as it is."""
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  result, error = None, None
  try:
    if is_primary() or not primary_only:
      result = fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  # shared first, re-raised below
    error = e
  report = ""
  if error is not None:
    message = str(error) if isinstance(error, USER_ERRORS) else f"{type(error).__name__}: {error}"
    report = f"{type(error).__name__}\n{message.strip() or type(error).__name__}"
  reports = all_gather_text(label, report)
  if error is not None and not isinstance(error, USER_ERRORS):
    raise error  # a bug: its traceback here, a SetupError on the other processes
  failed = [(p, *r.split("\n", 1)) for p, r in enumerate(reports) if r]
  if failed:
    process, kind, first = failed[0]
    alike = primary_only or (len(failed) == len(reports) and len(set(reports)) == 1)
    raise SetupError(first if alike else f"process {process} of {len(reports)}: {first}", kind)
  return result


def check_same(label: str, text: str) -> None:
  """SetupError on every process unless all passed the same `text` (e.g. the config)."""
  texts = all_gather_text(label, text)
  differing = [p for p, t in enumerate(texts) if t != texts[0]]
  if differing:
    raise SetupError(f"process {differing[0]} of {len(texts)} runs with another {label} than "
                     "process 0; run the same command (same flags and files) on every process.")


def exit_process(code: int) -> None:
  """Ends the process with `code`. In a multi-process run it waits at most a grace period at
  jax.distributed's shutdown barrier: processes that failed alike meet there and leave
  cleanly, while one that went on (and will be stopped by the runtime's heartbeats) is not
  waited for."""
  if not jax.distributed.is_initialized():
    sys.exit(code)
  sys.stdout.flush()
  sys.stderr.flush()
  done = threading.Event()

  def shut_down():
    try:
      jax.distributed.shutdown()
    except Exception:  # pylint: disable=broad-except  # the runtime already reported it
      pass
    done.set()
  threading.Thread(target=shut_down, daemon=True).start()
  done.wait(_EXIT_GRACE_S)
  os._exit(code)  # pylint: disable=protected-access


def wait_for_all(label: str) -> None:
  """A barrier over the processes (through the coordinator; no collective)."""
  all_gather_text(label, "")

