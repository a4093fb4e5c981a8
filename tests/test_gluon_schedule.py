"""A model of the Gluon forward's barrier protocol (backends/triton/gluon_forward.py), run on the CPU
under random interleavings of its partitions and of the copy engine's completions.

The model follows the kernel's own formulas for tile rounds, ring slots and mbarrier parities (a
fresh barrier reads as if phase 1 had completed; `wait(parity)` passes once the phase of that
parity has completed) and tags each shared-memory slot with what it holds. It fails
on a deadlock (every live partition spins) and on a race (a consumer finds a slot overwritten while
its wgmma may still read it, or Q of another tile). Change the protocol in the kernel, change it
here, and this test says whether the new one can hang or race: the GPU only shows a hang as a hang.
The tile order and the key-block ranges are the kernel's own functions (_tile_coords, _key_blocks),
run as plain Python; the ranges are also checked against a brute-force visible mask.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator

import pytest

pytest.importorskip("triton.experimental.gluon")

from flashdispatch.backends.triton import gluon_forward as gf  # noqa: E402
from flashdispatch.backends.triton.forward import kernel_window  # noqa: E402


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


def launch_window(sq: int, sk: int, causal: bool, window: tuple[int, int] | None) -> tuple[bool, int, int, bool]:
    """(causal, left, right, WINDOW) as the launcher hands them to the kernel."""
    causal = causal and sq > 1
    win = kernel_window(causal, window or (-1, -1), sq, sk)
    left, right = win if win is not None else (0, 0)
    return causal, left, right, win is not None


def key_blocks(start_m: int, sq: int, sk: int, block_m: int, block_n: int, causal: bool,
               window: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """The kernel's (n_lo, full_lo, full_hi, n_end) of a tile, as plain Python."""
    causal, left, right, on = launch_window(sq, sk, causal, window)
    return gf._key_blocks.fn(start_m, sq, sk, left, right, block_m, block_n, causal, on)


ORDERS = (gf.ORDER_HEAD, gf.ORDER_BOTTOM, gf.ORDER_PAIRS)


def tile_of(r: int, pid: int, nprog: int, order: int) -> int:
    return gf._tile_of.fn(r, pid, nprog, order)


def rounds(pid: int, nprog: int, num_tiles: int, order: int) -> int:
    return gf._rounds.fn(pid, nprog, num_tiles, order)


def max_programs(num_tiles: int, order: int) -> int:
    """Units of tiles (the launcher starts at most one CTA per unit)."""
    return cdiv(num_tiles, 2 if order == gf.ORDER_PAIRS else 1)


def run_cta(sq: int, sk: int, bh: int, nprog: int, pid: int, stages: int, block_n: int, causal: bool,
            o_separate: bool, consumers: int, xtile: bool, seed: int, producer_qbufs: int | None = None,
            window: tuple[int, int] | None = None, producer_from_zero: bool = False,
            order: int = gf.ORDER_HEAD) -> None:
    """One CTA of the kernel (its producer and consumers) to the end, in a random interleaving.
    producer_qbufs and producer_from_zero inject faults: the producer's count of Q buffers per
    warpgroup; a producer that loads every tile's key blocks from block 0 (not the window's n_lo)."""
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

    eff_causal, _, _, windowed = launch_window(sq, sk, causal, window)

    def tiles() -> Iterator[tuple[int, int]]:
        for r in range(rounds(pid, nprog, num_tiles, order)):
            t = tile_of(r, pid, nprog, order)
            yield t, gf._tile_coords.fn(t, num_m, bh, 1, 1, order, block_m)[0]

    def producer() -> Iterator[None]:
        kv = 0
        for ti, (t, start_m) in enumerate(tiles()):
            n_lo, _, _, n_end = key_blocks(start_m, sq, sk, block_m, block_n, causal, window)
            for w in range(consumers):
                qi = w * qbufs + ti % pq
                yield from wait(q_empty[qi], ((ti // pq) & 1) ^ 1)
                copies.append((q_ready[qi], lambda qi=qi, t=t: qslot.__setitem__(qi, t)))
            for j in range(0 if producer_from_zero else n_lo, n_end):
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
            n_lo, _, _, n_end = key_blocks(start_m, sq, sk, block_m, block_n, causal, window)
            qi = wg * qbufs + ti % qbufs
            yield from wait(q_ready[qi], (ti // qbufs) & 1)
            assert qslot[qi] == t, "Q of another tile"
            for j in range(n_lo, n_end):
                s, ph = kv % stages, (kv // stages) & 1
                yield from wait(k_ready[s], ph)
                prev = None
                if j > n_lo:
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
            if n_end > n_lo:
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
        # a window in half the runs: tiles that start past key 0, and tiles with no key at all
        window = (rng.choice([0, 1, 63, 200, -1]), rng.choice([0, 5, 130, -1])) if rng.random() < 0.5 else None
        order = rng.choice(ORDERS)
        nprog = min(nprog, max_programs(bh * cdiv(sq, 64 * consumers), order))
        for pid in range(nprog):
            run_cta(sq, sk, bh, nprog, pid, stages, block_n, causal, o_separate, consumers, xtile,
                    rng.randrange(1 << 30), window=window, order=order)


@pytest.mark.parametrize("order", ORDERS, ids=["head", "bottom", "pairs"])
def test_rounds_cover_every_tile_once(order: int) -> None:
    """Every (row block, head) is some CTA's tile exactly once, in every order, for every count of
    CTAs the launcher may start."""
    for num_bh in (1, 2, 3, 5):
        for num_m in range(1, 14):
            num_tiles = num_bh * num_m
            for nprog in range(1, min(max_programs(num_tiles, order), 40) + 1):
                got = sorted(gf._tile_coords.fn(tile_of(r, p, nprog, order), num_m, num_bh, 1, 1, order, 1)[:2]
                             for p in range(nprog) for r in range(rounds(p, nprog, num_tiles, order)))
                assert got == [(m, bh) for m in range(num_m) for bh in range(num_bh)]


def test_pairs_even_out_causal_tiles() -> None:
    """ORDER_PAIRS deals a heavy row block with its light mirror: under causal (Sq = Sk) every unit
    of two tiles sees num_m + 1 key blocks (an odd num_m: a head's middle block pairs across heads)."""
    def tiles(num_m: int, num_bh: int) -> list[tuple[int, int]]:
        return [gf._tile_coords.fn(t, num_m, num_bh, 1, 1, gf.ORDER_PAIRS, 1)[:2] for t in range(num_m * num_bh)]

    even = tiles(8, 3)
    for a, b in zip(even[0::2], even[1::2]):
        assert a[1] == b[1] and a[0] + b[0] == 7, (a, b)
    assert [m for m, bh in tiles(7, 3) if bh == 1] == [6, 0, 5, 1, 4, 2, 3]


def _sched(b: int, h: int, hkv: int, sq: int, sk: int, causal: bool = True, d: int = 128,
           l2: int = 50 * 2**20) -> int:
    num_m = cdiv(sq, 128)
    order, nprog = gf.schedule(b * h, num_m, sq, sk, 128, 128, causal, False, 132, b * hkv * sk * d * 4, l2)
    assert 1 <= nprog <= min(132, max_programs(b * h * num_m, order))
    return order


def test_schedule_picks_the_order_by_balance_then_locality() -> None:
    # tiles of equal cost: head by head (a chunk's rows all see a long prefix; no mask)
    assert _sched(4, 32, 32, 512, 8192) == gf.ORDER_HEAD
    assert _sched(16, 16, 16, 1024, 1024, causal=False) == gf.ORDER_HEAD
    # many short causal heads: head by head balances as well and reads each head's K/V once
    assert _sched(16, 16, 16, 1024, 1024) == gf.ORDER_HEAD
    # few long causal heads: head by head leaves CTAs idle (0.65 of the time used), pairs do not
    assert _sched(1, 16, 16, 16384, 16384) == gf.ORDER_PAIRS
    # few rounds and K/V that fit in L2 at once: bottom first balances best
    assert _sched(2, 8, 8, 3000, 3000) == gf.ORDER_BOTTOM
    # the same, but K/V beyond half of L2: never bottom first
    assert _sched(2, 8, 8, 3000, 3000, l2=16 * 2**20) != gf.ORDER_BOTTOM


def test_the_model_catches_a_broken_protocol() -> None:
    """The model fails when the protocol is wrong: a producer that fills one Q buffer per warpgroup
    while XTILE's consumers alternate between two hangs or hands a consumer another tile's Q."""
    with pytest.raises(AssertionError):
        for seed in range(20):
            run_cta(1000, 128, 3, 1, 0, 2, 128, False, True, 2, True, seed, producer_qbufs=1)
    with pytest.raises(AssertionError):  # the producer and the consumers disagree on a window's blocks
        run_cta(1000, 1000, 2, 1, 0, 2, 128, True, True, 2, False, 0, window=(200, 0), producer_from_zero=True)


# --- the key-block ranges against a brute-force visible mask ------------------------------------------


def brute_blocks(start_m: int, sq: int, sk: int, block_m: int, block_n: int, causal: bool,
                 window: tuple[int, int] | None) -> tuple[set[int], set[int]]:
    """(blocks holding a key that some row of the tile sees, blocks every row sees in full), from the
    per-row visible key ranges of flash_attn's rule (-1 unbounded; causal sets right to 0)."""
    left, right = window or (-1, -1)
    if causal and sq > 1:
        right = 0
    ranges = []
    for i in range(start_m, min(start_m + block_m, sq)):
        p = i + sk - sq
        lo = 0 if left < 0 else max(p - left, 0)
        hi = sk - 1 if right < 0 else min(p + right, sk - 1)
        ranges.append((lo, hi))
    seen, full = set(), set()
    for b in range(cdiv(sk, block_n)):
        first, last = b * block_n, min((b + 1) * block_n, sk) - 1
        if any(lo <= last and first <= hi for lo, hi in ranges):
            seen.add(b)
        if (b + 1) * block_n <= sk and ranges and all(lo <= first and last <= hi for lo, hi in ranges):
            full.add(b)
    return seen, full


def check_ranges(sq: int, sk: int, block_m: int, block_n: int, causal: bool, window: tuple[int, int] | None) -> int:
    """Every tile's ranges against the brute force; returns the key blocks the kernel visits."""
    visited = 0
    for start_m in range(0, sq, block_m):
        n_lo, full_lo, full_hi, n_end = key_blocks(start_m, sq, sk, block_m, block_n, causal, window)
        seen, full = brute_blocks(start_m, sq, sk, block_m, block_n, causal, window)
        where = (sq, sk, block_m, block_n, causal, window, start_m)
        assert n_lo <= full_lo <= full_hi <= max(n_end, n_lo), where
        assert set(range(n_lo, n_end)) == seen, where  # exactly the blocks with a visible pair
        assert set(range(full_lo, full_hi)) == full, where  # unmasked exactly where every row sees all
        visited += max(n_end - n_lo, 0)
    return visited


WINDOWS = [None, (0, 0), (1, 0), (63, 0), (64, 0), (127, 0), (1000, 0), (0, 5), (63, 130), (-1, 0), (-1, 70),
           (200, -1), (5, 5000)]


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_key_block_ranges_match_the_visible_mask(window: tuple[int, int] | None, causal: bool) -> None:
    for sq, sk in ((1, 300), (100, 100), (300, 300), (129, 1027), (1027, 129), (513, 700), (700, 513)):
        for block_m, block_n in ((128, 128), (128, 64), (192, 64)):
            check_ranges(sq, sk, block_m, block_n, causal, window)


def test_window_work_follows_the_visible_pairs() -> None:
    """Mistral's window at S=16k in the kernel's D=128 tiles: the blocks visited hold the visible
    pairs plus at most 4% (the masked edges), and so take the window's share of full causal's blocks
    (0.44 of the pairs)."""
    from flashdispatch.problem import causal_visible_pairs, window_visible_pairs

    s, block_m, block_n = 16384, 128, 128
    visited = sum(max(e - lo, 0) for lo, _, _, e in (
        key_blocks(m, s, s, block_m, block_n, True, (4095, 0)) for m in range(0, s, block_m)))
    causal_blocks = sum(key_blocks(m, s, s, block_m, block_n, True)[3] for m in range(0, s, block_m))
    pairs = window_visible_pairs(s, s, (4095, 0))
    assert pairs <= visited * block_m * block_n <= 1.04 * pairs
    assert visited / causal_blocks <= 1.03 * pairs / causal_visible_pairs(s, s)


def test_the_range_check_catches_a_wrong_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    """The brute force fails a range that is off by one block at the window's left edge."""
    real = gf._key_blocks.fn

    def off_by_one(*a: object) -> tuple[int, int, int, int]:
        n_lo, full_lo, full_hi, n_end = real(*a)
        return n_lo + 1, max(full_lo, n_lo + 1), max(full_hi, n_lo + 1), n_end

    monkeypatch.setattr(gf._key_blocks, "fn", off_by_one)
    with pytest.raises(AssertionError):
        check_ranges(1000, 1000, 128, 128, True, (300, 0))


@pytest.mark.parametrize("order", ORDERS, ids=["head", "bottom", "pairs"])
def test_the_host_model_deals_as_the_kernel_does(order: int) -> None:
    """schedule()'s model (dealt_to, row_blocks, tile_heads, programs) is the kernel's own dealing and
    numbering: the CTA, row block and head of every tile index agree with _tile_of / _rounds /
    _tile_coords, and the causal tile costs with _key_blocks."""
    for num_bh, num_m, sms in [(1, 1, 132), (3, 7, 4), (2, 8, 5), (5, 3, 132), (4, 13, 9)]:
        num_tiles = num_bh * num_m
        nprog = gf.programs(order, num_tiles, sms)
        owner = gf.dealt_to(num_tiles, nprog, gf.order_unit(order))
        for p in range(nprog):
            mine = [tile_of(r, p, nprog, order) for r in range(rounds(p, nprog, num_tiles, order))]
            assert mine and sorted(mine) == [t for t in range(num_tiles) if owner[t] == p]
        coords = [gf._tile_coords.fn(t, num_m, num_bh, 1, 1, order, 1)[:2] for t in range(num_tiles)]
        assert [int(m) for m in gf.row_blocks(order, num_bh, num_m)] == [m for m, _ in coords]
        assert [int(h) for h in gf.tile_heads(order, num_bh, num_m)] == [bh for _, bh in coords]
        for sq, sk in ((num_m * 128, num_m * 128), (num_m * 128 - 50, num_m * 128 + 300), (num_m * 128, 77)):
            ranges = (key_blocks(m * 128, sq, sk, 128, 128, True) for m in range(num_m))
            want = [max(0, e - lo) for lo, _, _, e in ranges]
            assert [int(c) for c in gf.causal_row_block_costs(num_m, sq, sk, 128, 128)] == want, (sq, sk)


def test_the_schedule_model_shows_bottom_first_bound_on_memory(capsys: pytest.CaptureFixture[str]) -> None:
    """tools/gluon_schedule_model: bottom-first makes each round read every head's K/V (B=16 H=16
    S=1k causal: most reads miss, more HBM time than tensor time on an H100), head by head does not."""
    from flashdispatch.tools import gluon_schedule_model as gsm

    head = gsm.model(16, 16, 16, 1024, 1024, 128, gf.ORDER_HEAD)
    bottom = gsm.model(16, 16, 16, 1024, 1024, 128, gf.ORDER_BOTTOM)
    assert bottom.miss > 0.9 and head.miss < 0.3
    assert bottom.memory_us > bottom.tensor_us > head.memory_us
    assert gsm.main(["--shape", "1,4,2,700,700,64"]) == 0
    assert capsys.readouterr().out.count("B1 H4/2 700x700 D64") == 3
