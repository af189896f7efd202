"""Train-state checkpoints: an Orbax CheckpointManager holding, per step, the train state, the
data iterator's state and a small metadata record, written asynchronously and atomically.

Layout of `<directory>/<step>/`:
  state/  the train state as a flat {leaf name: array} dict (names from the pytree key paths,
          e.g. "params.layers.0.attn.wq.value"); typed PRNG keys are stored as their raw key
          data and re-wrapped on restore, so callers pass and get back `jax.random.key` arrays.
  data/   the data iterator's `get_state()` dict (JSON); in a multi-process run one file per
          process (`process_<i>_of_<n>.json`), each process's own share of the data.
  meta/   {"step", "eval_loss", "key_impls"} (JSON).
  metrics/ {"eval_loss"} for steps that had one; Orbax reads it back to rank checkpoints.

Orbax writes a step under `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once every
file is written, so a process killed mid-save leaves only that temporary directory: Orbax does
not list it as a step, and the next TrainCheckpointer on the directory deletes it. One run
writes a directory at a time: opening a second TrainCheckpointer on it deletes the first one's
in-flight save, so train.py holds the workdir's lock (dsjax.train.workdir_lock) while it
trains. In a multi-process run every process saves and restores its shards of the same step
(Orbax's collective save; process 0 writes the metadata and commits).

A checkpoint that cannot be read (a truncated or missing file) raises UnreadableCheckpoint;
`restore_newest_readable` then falls back to the newest one that can be read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from dsjax.parallel import distributed
from dsjax.train.read_noise import quiet_failed_reads

_STATE, _DATA, _META = "state", "data", "meta"
# How many mismatching leaves an error message lists before summarising the rest.
_MAX_LISTED = 4


class UnreadableCheckpoint(ValueError):
  """A checkpoint whose files cannot be read (truncated, missing, not Orbax's format)."""

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


class _DropNoMetricsWarning(logging.Filter):
  """Saves without an eval loss are normal here, but Orbax warns about each one."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropNoMetricsWarning())


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _entry_name(entry) -> str:
  for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flatten_by_name(tree) -> tuple[dict[str, Any], Any]:
  """({leaf name: leaf}, treedef): names join the key path with '.', as Orbax names params."""
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  flat = {}
  for path, leaf in leaves_with_paths:
    name = ".".join(_entry_name(e) for e in path) or "root"
    if name in flat:
      raise ValueError(f"Two leaves of the train state share the checkpoint name {name!r}; "
                       "rename the pytree keys so that '.'-joined key paths are unique.")
    flat[name] = leaf
  return flat, treedef


def _to_target(leaf) -> jax.ShapeDtypeStruct:
  """The restore target of one leaf: its shape, dtype and sharding (default: first device)."""
  if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
    raise TypeError(f"restore() needs arrays or jax.ShapeDtypeStruct leaves, got {type(leaf)}; "
                    "build abstract_state with jax.eval_shape or pass the concrete state.")
  sharding = getattr(leaf, "sharding", None)
  if sharding is None:
    # Orbax restores sharding-less targets as host numpy arrays; keep them on a device.
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if _is_key(leaf):
    # NamedSharding / SingleDeviceSharding also fit the key data's extra trailing axis.
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _mismatch(stored: dict[str, Any], target: dict[str, jax.ShapeDtypeStruct]) -> str:
  """A short description of how the stored tree differs from the target ('' if it fits)."""
  def listed(names):
    names = sorted(names)
    more = f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more
  problems = []
  if missing := set(target) - set(stored):
    problems.append(f"not in the checkpoint: {listed(missing)}")
  if extra := set(stored) - set(target):
    problems.append(f"only in the checkpoint: {listed(extra)}")
  shapes = [f"{n} {tuple(stored[n].shape)} vs {tuple(target[n].shape)}"
            for n in sorted(set(stored) & set(target))
            if tuple(stored[n].shape) != tuple(target[n].shape)]
  if shapes:
    more = f" (+{len(shapes) - _MAX_LISTED} more)" if len(shapes) > _MAX_LISTED else ""
    problems.append("shapes (checkpoint vs target): " + ", ".join(shapes[:_MAX_LISTED]) + more)
  return "; ".join(problems)


def _remove_unfinished_saves(directory: str) -> None:
  """Deletes the temporary step directories left by a process killed while saving (process 0;
  the others wait, so that none lists a directory being deleted)."""
  if jax.process_index() == 0 and os.path.isdir(directory):
    for tmp in ocp.path.step.all_temporary_paths(directory):
      shutil.rmtree(os.fspath(tmp.get()), ignore_errors=True)
  distributed.wait_for_all("removed unfinished checkpoint saves")


def _data_handler() -> ocp.JsonCheckpointHandler:
  """The data item's handler: each process's iterator state is its own (its share of the
  batches), so in a multi-process run every process writes its own file."""
  count = jax.process_count()
  if count == 1:
    return ocp.JsonCheckpointHandler()  # data/metadata, as single-process runs always wrote
  return ocp.JsonCheckpointHandler(
      filename=f"process_{jax.process_index()}_of_{count}.json",
      multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None))


def one_line(error: BaseException, limit: int = 300) -> str:
  """The root cause of `error` on one line (tensorstore's is the one that names the file)."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = " ".join(str(error).split())
  text = text if len(text) <= limit else text[:limit] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


class TrainCheckpointer:
  """Saves and restores (train state, data iterator state) under `directory`.

  Keeps the latest `keep` checkpoints plus the one with the lowest eval loss. Saves are
  asynchronous when `async_save`: `save` returns once the arrays are copied off the devices
  and the files are written in the background. Call `wait()` before reading a checkpoint
  from another process and `close()` at the end of training.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep={keep}: keep at least the latest checkpoint (keep >= 1).")
    self.directory = os.path.abspath(os.fspath(directory))
    _remove_unfinished_saves(self.directory)
    policy = ocm.AnyPreservationPolicy([
        ocm.LatestN(n=keep),
        ocm.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        # best_fn plays no part in retention once preservation_policy is set, but without it
        # Orbax neither writes the metrics nor reads them back, so a restarted run would
        # forget which checkpoint was best.
        best_fn=lambda m: m["eval_loss"], best_mode="min",
        # Done synchronously above instead: Orbax's cleanup runs in a background thread that
        # logs a traceback when the process exits before it ran (e.g. a restore-only tool).
        cleanup_tmp_directories=False,
        enable_async_checkpointing=async_save,
        create=True)
    handlers = {_STATE: ocp.StandardCheckpointHandler(), _DATA: _data_handler(),
                _META: ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=handlers)

  def latest_step(self) -> int | None:
    """The newest checkpoint's step (in this process, including one still being written)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of all kept checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, eval_loss: float | None = None, *,
           force: bool = False) -> bool:
    """Starts saving `state` (a pytree of arrays) and `data_state` (JSON dict) as `step`.

    Returns whether a save started: False when `step` already has a checkpoint, or (unless
    `force`) when it is not newer than the latest one. A non-finite eval_loss counts as none.
    Waits for the previous save to finish first.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    try:
      json.dumps(data_state)
    except (TypeError, ValueError) as e:
      raise TypeError(f"data_state must be a JSON-serialisable dict (the data iterator's "
                      f"get_state()); json.dumps failed: {e}") from e
    flat, _ = flatten_by_name(state)
    key_impls = {n: str(jax.random.key_impl(x)) for n, x in flat.items() if _is_key(x)}
    flat = {n: jax.random.key_data(x) if n in key_impls else x for n, x in flat.items()}
    has_loss = eval_loss is not None and math.isfinite(float(eval_loss))
    loss = float(eval_loss) if has_loss else None
    meta = {"step": step, "eval_loss": loss, "key_impls": key_impls}
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(flat),
                                 _DATA: ocp.args.JsonSave(data_state),
                                 _META: ocp.args.JsonSave(meta)})
    metrics = {"eval_loss": loss} if has_loss else None
    return bool(self._manager.save(step, args=args, metrics=metrics, force=force))

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
    """(state, data_state) of checkpoint `step` (default: the latest one).

    `abstract_state` is the train state's structure: jax.ShapeDtypeStruct leaves (or concrete
    arrays); arrays are restored with their `.sharding` (first device where it is None) and
    dtype, and typed PRNG keys come back as keys. Raises ValueError when the checkpoint holds
    another structure (another config) and UnreadableCheckpoint when its files cannot be read.
    """
    self.wait()
    step = self._resolve_step(step)
    flat_abstract, treedef = flatten_by_name(abstract_state)
    target = {n: _to_target(x) for n, x in flat_abstract.items()}
    self._check_fits(step, target)
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target),
                                 _DATA: ocp.args.JsonRestore(), _META: ocp.args.JsonRestore()})
    try:
      with quiet_failed_reads():
        restored = self._manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except  # tensorstore's errors are plain
      raise self._unreadable(step, e) from e
    flat = dict(restored[_STATE])
    key_impls = restored[_META].get("key_impls", {})
    for name in (n for n, x in flat_abstract.items() if _is_key(x)):
      if name not in key_impls:
        raise self._config_error(step, f"{name} is a PRNG key in the target but was saved as "
                                 "plain key data")
      flat[name] = jax.random.wrap_key_data(flat[name], impl=key_impls[name])
    state = jax.tree_util.tree_unflatten(treedef, [flat[n] for n in flat_abstract])
    return state, dict(restored[_DATA])

  def restore_newest_readable(self, abstract_state, warn: Callable[[str], None]
                              ) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest checkpoint that can be read, or None when there
    is none. Each unreadable newer one is skipped with one `warn` line naming it and is left
    as it is; if every checkpoint is unreadable, raises UnreadableCheckpoint. Processes agree
    on each attempt, so all restore the same step (or all stop with the same error)."""
    steps, skipped = self.all_steps(), []
    for step in reversed(steps):
      try:
        state, data_state = distributed.agree(f"restore step {step}", self.restore,
                                              abstract_state, step)
      except (UnreadableCheckpoint, distributed.SetupError) as e:
        if getattr(e, "kind", UnreadableCheckpoint.__name__) != UnreadableCheckpoint.__name__:
          raise
        skipped.append(step)
        older = [s for s in steps if s < step]
        then = f"resuming from step {older[-1]}" if older else "no older checkpoint left"
        warn(f"warning: {e}; {then}. The unreadable checkpoint is left in place (move it out "
             f"of {self.directory} to have this run save step {step} again).")
        continue
      return step, state, data_state
    if skipped:
      raise UnreadableCheckpoint(skipped[0], f"No checkpoint in {self.directory} can be read "
                                 f"(steps {skipped}); move them away to train from scratch, or "
                                 "use a new --workdir.")
    return None

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed (and old steps deleted)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.close()

  def __enter__(self) -> TrainCheckpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _resolve_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}; train from scratch, or "
                              "point --workdir at the run directory that holds checkpoints.")
    if step is None:
      return steps[-1]
    if int(step) not in steps:
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                              f"available steps: {steps}.")
    return int(step)

  def _check_fits(self, step: int, target: dict[str, jax.ShapeDtypeStruct]) -> None:
    try:
      with quiet_failed_reads():
        stored = self._manager.item_metadata(step)[_STATE]
      stored = dict(getattr(stored, "tree", stored))
    except Exception as e:  # pylint: disable=broad-except  # a missing or corrupt _METADATA
      raise self._unreadable(step, e) from e
    problem = _mismatch(stored, target)
    if problem:
      raise self._config_error(step, problem)

  def _unreadable(self, step: int, error: BaseException) -> UnreadableCheckpoint:
    return UnreadableCheckpoint(step, f"checkpoint step {step} in {self.directory} cannot be "
                                f"read ({one_line(error)})")

  def _config_error(self, step: int, detail: str) -> ValueError:
    return ValueError(
        f"The checkpoint in {self.directory} (step {step}) was written by a different config "
        f"than the train state being restored ({detail}). Use a new --workdir, or resume with "
        "the config that wrote this checkpoint.")
