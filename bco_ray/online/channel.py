"""The channel between an online job's driver and its Ray Train workers, which stay alive across rounds: one small
async Ray actor (no CPU) the driver creates and hands to the workers in their loop config.

    workers → driver   ready(info)          rank 0, once per worker-group start: rounds its checkpoint holds, the
                                            exported policy (a resumed group) or None, the worker's pid
    driver → workers   post(r, message)     {"kind": "round", ...}: round r's scored rows (a Parquet path) and where
                                            to export the weights;
                                            post(r, STOP) ends the loop (the final model is saved), ABORT without
    workers → driver   done(r, metrics)     rank 0 after round r's update, export and checkpoint (again, from
                                            the checkpoint, by a group restarted before it said so)

Messages are kept by round, so a worker group that Ray Train restarts (a failed worker) asks again for the round its
checkpoint stops before and gets the same message. Every wait is asyncio, so nothing polls."""

from __future__ import annotations

import asyncio

import ray

STOP, ABORT = {"kind": "stop"}, {"kind": "abort"}  # every message is a dict with a "kind"


@ray.remote(num_cpus=0)
class Channel:
    def __init__(self):
        self.rounds: dict[int, dict] = {}
        self.results: dict[int, dict] = {}
        self.readies: list[dict] = []
        self.changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _wait(self, ready, timeout: float | None):
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(ready), timeout)
            except asyncio.TimeoutError:
                return False
        return True

    async def ready(self, info: dict) -> None:
        self.readies.append(info)
        await self._notify()

    async def wait_ready(self, count: int, timeout: float | None = None) -> dict | None:
        """The `count`-th ready message (1: the first group start), or None after `timeout` s."""
        ok = await self._wait(lambda: len(self.readies) >= count, timeout)
        return self.readies[count - 1] if ok else None

    async def starts(self) -> list[dict]:
        return list(self.readies)

    async def post(self, r: int, message: dict) -> None:
        self.rounds[r] = message
        await self._notify()

    async def next(self, r: int) -> dict:
        """Round r's message (waits for it); ABORT stands for every round once posted."""
        await self._wait(lambda: r in self.rounds or -1 in self.rounds, None)
        return self.rounds.get(r, self.rounds.get(-1))

    async def abort(self) -> None:
        await self.post(-1, ABORT)

    async def done(self, r: int, metrics: dict) -> None:
        self.results[r] = metrics
        await self._notify()

    async def done_if_missing(self, r: int, metrics: dict) -> None:
        """`done(r, metrics)` unless round r's result is in already (a group restarted between round r's
        checkpoint and its `done`)."""
        if r not in self.results:
            await self.done(r, metrics)

    async def result(self, r: int, timeout: float | None = None) -> dict | None:
        """Round r's update metrics, or None after `timeout` s."""
        ok = await self._wait(lambda: r in self.results, timeout)
        return self.results[r] if ok else None
