"""A model of the Gluon forward's barrier protocol (backends/triton/gluon_forward.py), run on the CPU
under random interleavings of its partitions and of the copy engine's completions.

The model follows the kernel's own formulas for tile rounds, key-block ranges, ring slots and
mbarrier parities (a fresh barrier reads as if phase 1 had completed; `wait(parity)` passes once the
phase of that parity has completed) and tags each shared-memory slot with what it holds. It fails
on a deadlock (every live partition spins) and on a race (a consumer finds a slot overwritten while
its wgmma may still read it, or Q of another tile). Change the protocol in the kernel, change it
here, and this test says whether the new one can hang or race: the GPU only shows a hang as a hang.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator

import pytest


class Barrier:
    def __init__(self, count: int) -> None:
        self.count, self.pending, self.phases = count, 0, 0

    def arrive(self) -> None:
        self.pending += 1
        assert self.pending <= self.count, "more arrivals than the barrier's count in one phase"
        if self.pending == self.count:
            self.pending, self.phases = 0, self.phases + 1

    def passed(self, parity: int) -> bool:
        return (self.phases & 1) != parity


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def key_blocks(start_m: int, sq: int, sk: int, block_m: int, block_n: int, causal: bool) -> tuple[int, int]:
    if causal:
        off = sk - sq
        hi, full = max(min(start_m + block_m + off, sk), 0), max(min(start_m + off + 1, sk), 0)
    else:
        hi = full = sk
    return full // block_n, cdiv(hi, block_n)


def tile_of(r: int, pid: int, nprog: int) -> int:
    return r * nprog + pid + (r % 2) * (nprog - 1 - 2 * pid)


def rounds(pid: int, nprog: int, num_tiles: int) -> int:
    n = cdiv(num_tiles, nprog)
    return n - (tile_of(n - 1, pid, nprog) >= num_tiles)


def run_cta(sq: int, sk: int, bh: int, nprog: int, pid: int, stages: int, block_n: int, causal: bool,
            o_separate: bool, consumers: int, xtile: bool, seed: int, producer_qbufs: int | None = None) -> None:
    """One CTA of the kernel (its producer and consumers) to the end, in a random interleaving.
    producer_qbufs injects a fault: the producer's count of Q buffers per warpgroup."""
    rng = random.Random(seed)
    qbufs = 2 if xtile else 1
    pq = qbufs if producer_qbufs is None else producer_qbufs
    block_m = 64 * consumers
    num_m = cdiv(sq, block_m)
    num_tiles = bh * num_m
    q_ready = [Barrier(1) for _ in range(consumers * qbufs)]
    q_empty = [Barrier(1) for _ in range(consumers * qbufs)]
    k_ready, v_ready = [Barrier(1) for _ in range(stages)], [Barrier(1) for _ in range(stages)]
    k_empty, v_empty = [Barrier(consumers) for _ in range(stages)], [Barrier(consumers) for _ in range(stages)]
    turn = [Barrier(1) for _ in range(consumers)]
    kslot: list[Any] = [None] * stages
    vslot: list[Any] = [None] * stages
    qslot: list[Any] = [None] * (consumers * qbufs)
    copies: list[tuple[Barrier, Callable[[], None]]] = []  # in flight on the copy engine

    def wait(bar: Barrier, parity: int) -> Iterator[None]:
        while not bar.passed(parity):
            yield

    def tiles() -> Iterator[tuple[int, int]]:
        for r in range(rounds(pid, nprog, num_tiles)):
            t = tile_of(r, pid, nprog)
            yield t, (num_m - 1 - t // bh if causal else t % num_m) * block_m

    def producer() -> Iterator[None]:
        kv = 0
        for ti, (t, start_m) in enumerate(tiles()):
            n_end = key_blocks(start_m, sq, sk, block_m, block_n, causal)[1]
            for w in range(consumers):
                qi = w * qbufs + ti % pq
                yield from wait(q_empty[qi], ((ti // pq) & 1) ^ 1)
                copies.append((q_ready[qi], lambda qi=qi, t=t: qslot.__setitem__(qi, t)))
            for j in range(n_end):
                s, ph = kv % stages, (kv // stages) & 1
                yield from wait(k_empty[s], ph ^ 1)
                copies.append((k_ready[s], lambda s=s, t=t, j=j: kslot.__setitem__(s, (t, j))))
                yield from wait(v_empty[s], ph ^ 1)
                copies.append((v_ready[s], lambda s=s, t=t, j=j: vslot.__setitem__(s, (t, j))))
                kv += 1

    def consumer(wg: int) -> Iterator[None]:
        kv, turns = 0, 0
        pending = None  # XTILE: (tile, block) whose last P V is still to issue

        def take() -> Iterator[None]:
            yield from wait(turn[wg], (turns & 1) ^ (1 if wg == 0 else 0))

        def give() -> None:
            nonlocal turns
            turn[(wg + 1) % consumers].arrive()
            turns += 1

        def last_pv(tag: tuple[int, int]) -> Iterator[None]:
            ps = (kv - 1) % stages
            yield from wait(v_ready[ps], ((kv - 1) // stages) & 1)
            yield from take()
            give()
            yield  # P V in flight
            assert vslot[ps] == tag, "V overwritten under a P V"
            v_empty[ps].arrive()

        for ti, (t, start_m) in enumerate(tiles()):
            n_end = key_blocks(start_m, sq, sk, block_m, block_n, causal)[1]
            qi = wg * qbufs + ti % qbufs
            yield from wait(q_ready[qi], (ti // qbufs) & 1)
            assert qslot[qi] == t, "Q of another tile"
            for j in range(n_end):
                s, ph = kv % stages, (kv // stages) & 1
                yield from wait(k_ready[s], ph)
                prev = None
                if j > 0:
                    prev = ((kv - 1) % stages, (t, j - 1))
                elif pending is not None:
                    prev = ((kv - 1) % stages, pending)
                if prev is not None:
                    yield from wait(v_ready[prev[0]], ((kv - 1) // stages) & 1)
                yield from take()
                assert kslot[s] == (t, j) and (prev is None or vslot[prev[0]] == prev[1])
                give()
                yield  # S (and P V) in flight
                assert kslot[s] == (t, j) and qslot[qi] == t, "K or Q overwritten under S = Q K^T"
                k_empty[s].arrive()
                if prev is not None:
                    yield  # P V still in flight
                    assert vslot[prev[0]] == prev[1], "V overwritten under a P V"
                    v_empty[prev[0]].arrive()
                pending = None
                kv += 1
            if n_end > 0:
                if o_separate:
                    q_empty[qi].arrive()
                if xtile:
                    pending = (t, n_end - 1)
                else:
                    yield from last_pv((t, n_end - 1))
            else:
                if pending is not None:
                    yield from last_pv(pending)
                    pending = None
                if o_separate:
                    q_empty[qi].arrive()
            if not o_separate:  # O out through Q's buffer, then Q handed back
                yield
                q_empty[qi].arrive()
        if pending is not None:
            yield from last_pv(pending)

    parts = [producer()] + [consumer(w) for w in range(consumers)]
    alive = [True] * len(parts)
    for _ in range(500_000):
        if not any(alive) and not copies:
            return
        choices = [i for i, a in enumerate(alive) if a] + ([-1] if copies else [])
        c = rng.choice(choices)
        if c == -1:  # a copy lands (not always the oldest)
            bar, land = copies.pop(rng.randrange(len(copies)) if rng.random() < 0.3 else 0)
            land()
            bar.arrive()
            continue
        try:
            next(parts[c])
        except StopIteration:
            alive[c] = False
    raise AssertionError("deadlock: the partitions wait on each other")


CONFIGS = [  # (consumers, stages, block_n, o_separate, xtile): the kernel's configs
    (2, 2, 128, True, False), (2, 3, 128, True, False), (2, 2, 64, False, False), (2, 2, 128, True, True),
    (3, 2, 128, True, False), (3, 4, 64, True, False), (3, 3, 128, True, True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "c{}-s{}-n{}{}{}".format(
    c[0], c[1], c[2], "" if c[3] else "-o-in-q", "-xtile" if c[4] else ""))
def test_protocol_neither_hangs_nor_races(cfg: tuple[int, int, int, bool, bool]) -> None:
    consumers, stages, block_n, o_separate, xtile = cfg
    rng = random.Random(hash(cfg) & 0xFFFF)
    for _ in range(12):
        sq, sk = rng.choice([1, 64, 100, 129, 300, 1027]), rng.choice([1, 50, 128, 500, 1027])
        bh, nprog, causal = rng.choice([1, 3, 7]), rng.choice([1, 2, 5]), rng.random() < 0.6
        num_tiles = bh * cdiv(sq, 64 * consumers)
        nprog = min(nprog, num_tiles)
        for pid in range(nprog):
            run_cta(sq, sk, bh, nprog, pid, stages, block_n, causal, o_separate, consumers, xtile,
                    rng.randrange(1 << 30))


def test_rounds_cover_every_tile_once() -> None:
    for num_tiles in range(1, 200):
        for nprog in range(1, min(num_tiles, 40) + 1):
            got = sorted(tile_of(r, p, nprog) for p in range(nprog) for r in range(rounds(p, nprog, num_tiles)))
            assert got == list(range(num_tiles))


def test_the_model_catches_a_broken_protocol() -> None:
    """The model fails when the protocol is wrong: a producer that fills one Q buffer per warpgroup
    while XTILE's consumers alternate between two hangs or hands a consumer another tile's Q."""
    with pytest.raises(AssertionError):
        for seed in range(20):
            run_cta(1000, 128, 3, 1, 0, 2, 128, False, True, 2, True, seed, producer_qbufs=1)
