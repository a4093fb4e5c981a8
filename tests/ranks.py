"""Running a test body on several ranks: spawned processes that join one process group through a
file store, each sending its report (or its traceback) back through a queue.

    def body(rank, world):                 # runs inside the group, returns a picklable report
        ...
    reports = run_ranks(body, world, tmp_dir, backend="gloo", timeout_s=300)   # [rank 0's, rank 1's, ...]

`body` must be a module-level function (spawn pickles it by name). A rank that raises fails the
calling test with that rank's traceback; ranks still alive after the reports are in are ended.
"""

from __future__ import annotations

import datetime
import os
import traceback
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(body: Callable[[int, int], Any], rank: int, world: int, store_path: str, backend: str,
               timeout_s: float, queue: Any) -> None:
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
            extra: dict[str, Any] = {"device_id": torch.device("cuda", rank)}
        else:
            torch.set_num_threads(1)
            extra = {}
        dist.init_process_group(backend, store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **extra)
        report = body(rank, world)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, "ok", report))
    except Exception:
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(body: Callable[[int, int], Any], world: int, tmp_dir: str | os.PathLike[str], *, backend: str,
              timeout_s: float) -> list[Any]:
    """body(rank, world) on `world` spawned ranks of one `backend` group; their reports by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = os.path.join(str(tmp_dir), "store")
    procs = [ctx.Process(target=_rank_main, args=(body, r, world, store, backend, timeout_s, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, payload = queue.get(timeout=timeout_s)
            if status != "ok":
                pytest.fail(f"world={world} rank {rank} raised:\n{payload}")
            got[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return [got[r] for r in range(world)]
