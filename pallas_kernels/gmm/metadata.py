"""Work items of a grouped matmul: which (group, row tile) pairs a kernel visits, in row order.

Rows of lhs are sorted by group: group g owns rows [start_g, end_g). A kernel walks "work
items"; item i multiplies row tile `tile_ids[i]` by group `group_ids[i]`'s weights and owns only
the rows [row_starts[i], row_ends[i]) of that tile. A tile that straddles two groups is visited
once per group, each visit writing its own rows.

Invariants both kernels rely on (tests check them):
  * items are sorted by tile and by group, so all visits of a tile (gmm) and all visits of a
    group (tgmm) are consecutive;
  * every row tile is visited at least once (gmm writes zeros to rows no local group owns);
  * every local group is visited at least once, even when empty (tgmm writes its zeros);
  * the static item count is tiles + local groups - 1; unused trailing items repeat the last
    (group, tile) with an empty row range, so they change nothing.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupMetadata(NamedTuple):
  """int32 arrays of length `num_items(m, tile_rows, local_groups)`."""
  group_ids: jax.Array   # local group (0 .. local_groups-1) of each item
  tile_ids: jax.Array    # row tile of each item
  row_starts: jax.Array  # first row (absolute) the item owns
  row_ends: jax.Array    # one past the last row it owns (== row_starts: owns none)


def num_items(m: int, tile_rows: int, local_groups: int) -> int:
  """Static upper bound on the work items (see the module docstring)."""
  return -(-m // tile_rows) + local_groups - 1


def local_row_bounds(group_sizes: jax.Array, group_offset, local_groups: int, m: int):
  """Rows [start_g, end_g) of the local groups group_offset .. group_offset+local_groups-1,
  clipped to the m rows of lhs."""
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  offset = jnp.asarray(group_offset, jnp.int32)
  starts = jax.lax.dynamic_slice_in_dim(starts, offset, local_groups)
  ends = jax.lax.dynamic_slice_in_dim(ends, offset, local_groups)
  return jnp.minimum(starts, m), jnp.minimum(ends, m)


def make_group_metadata(group_sizes: jax.Array, m: int, tile_rows: int,
                        group_offset=0, local_groups: int | None = None) -> GroupMetadata:
  """Work items for lhs rows [m] cut into tiles of `tile_rows`, for the local groups
  `group_offset .. group_offset + local_groups - 1` of `group_sizes` (all groups by default)."""
  local_groups = group_sizes.shape[0] if local_groups is None else local_groups
  starts, ends = local_row_bounds(group_sizes, group_offset, local_groups, m)
  tiles = -(-m // tile_rows)
  first = jnp.minimum(starts // tile_rows, tiles - 1)
  last = jnp.where(ends > starts, (ends - 1) // tile_rows, first)
  # Rows before the first local group and after the last one belong to no local group: their
  # tiles are visited by the first / last group (with nothing to multiply) so that gmm zeros
  # them. Consecutive groups share at most one tile, hence the static bound on the item count.
  first = first.at[0].set(0)
  last = last.at[-1].set(tiles - 1)
  counts = last - first + 1
  total = num_items(m, tile_rows, local_groups)
  group_ids = jnp.repeat(jnp.arange(local_groups, dtype=jnp.int32), counts,
                         total_repeat_length=total)
  item = jnp.arange(total, dtype=jnp.int32)
  index_in_group = item - (jnp.cumsum(counts) - counts)[group_ids]
  used = item < jnp.sum(counts)
  tile_ids = jnp.minimum(first[group_ids] + index_in_group, last[group_ids])
  tile_start = tile_ids * tile_rows
  row_starts = jnp.clip(starts[group_ids], tile_start, tile_start + tile_rows)
  row_ends = jnp.clip(ends[group_ids], row_starts, tile_start + tile_rows)
  row_ends = jnp.where(used, row_ends, row_starts)
  return GroupMetadata(group_ids, tile_ids.astype(jnp.int32), row_starts.astype(jnp.int32),
                       row_ends.astype(jnp.int32))
