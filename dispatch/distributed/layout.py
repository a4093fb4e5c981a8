"""Where each rank's slice of the sequence lies, and what each ring step computes.

Under a causal mask a plain contiguous split gives the last rank all the work: its queries see every
key, the first rank's see almost none. The load-balanced ("zig-zag") layout cuts the sequence into
2 * world equal chunks and gives rank r chunks r and 2*world-1-r, so that every rank holds one early
and one late chunk. With c the chunk length and the local slice being [chunk r | chunk 2W-1-r], the
block a rank computes when it holds the K/V slice of rank `src` is, for every (rank, src) pair:

    src == rank   the local causal square (2c x 2c): chunk r's queries come before chunk 2W-1-r's,
                  so the global mask restricted to the slice is the plain causal mask
    src <  rank   every local query against the first c keys (chunk src), unmasked; the second
                  chunk of src (2W-1-src > 2W-1-r) lies after every local query
    src >  rank   the last c queries (chunk 2W-1-r) against all 2c keys, unmasked; chunk r lies
                  before both chunks of src

so every step holds 2c^2 visible pairs and nothing masked is computed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Block(NamedTuple):
    """One ring step's work on a rank: query rows x key rows of the local slices, and the mask."""

    src: int  # group rank whose K/V slice is held at this step
    q_rows: slice
    kv_rows: slice
    causal: bool  # bottom-right causal square (only ever on the rank's own slice)

    def describe(self) -> str:
        def span(s: slice) -> str:
            return f"[{s.start}:{s.stop}]"

        mask = "causal" if self.causal else "full"
        return f"q{span(self.q_rows)} x kv{span(self.kv_rows)} {mask}"


def source_rank(rank: int, step: int, world: int) -> int:
    """K/V slices travel from rank r to r+1, so at step s rank r holds the slice of rank r-s."""
    return (rank - step) % world


def ring_blocks(rank: int, world: int, local_len: int, causal: bool) -> list[Block]:
    """The block computed at each of the `world` ring steps by `rank` (local slices of `local_len`)."""
    everything = slice(0, local_len)
    if not causal:
        return [Block(source_rank(rank, s, world), everything, everything, False) for s in range(world)]
    half = local_len // 2
    blocks = []
    for s in range(world):
        src = source_rank(rank, s, world)
        if src == rank:
            blocks.append(Block(src, everything, everything, True))
        elif src < rank:
            blocks.append(Block(src, everything, slice(0, half), False))
        else:
            blocks.append(Block(src, slice(half, local_len), everything, False))
    return blocks


def chunk_order(world: int, balanced: bool) -> list[list[int]]:
    """Per rank, the chunk indices of its slice (2*world chunks when balanced, else world)."""
    if balanced:
        return [[r, 2 * world - 1 - r] for r in range(world)]
    return [[r] for r in range(world)]


def check_divisible(length: int, world: int, balanced: bool, arg: str) -> int:
    """The chunk length, or a ValueError naming `arg` when the sequence does not split evenly."""
    parts = 2 * world if balanced else world
    if length % parts:
        why = (
            f"a multiple of 2 * world = {parts} (the load-balanced layout cuts the sequence into "
            "2 * world equal chunks)"
            if balanced
            else f"a multiple of world = {parts}"
        )
        raise ValueError(f"{arg}: expected {why}, got {length}")
    return length // parts


def global_positions(
    length: int, rank: int, world: int, *, balanced: bool = True, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global sequence positions (int64) of the local slice, in local order (e.g. for rotary)."""
    c = check_divisible(length, world, balanced, "length")
    return torch.cat(
        [torch.arange(i * c, (i + 1) * c, device=device) for i in chunk_order(world, balanced)[rank]]
    )
