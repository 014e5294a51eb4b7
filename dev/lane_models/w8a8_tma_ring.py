"""Protocol model of w8a8_tma_kernel's ring (csrc/cuda/int8.cu), for checking its
synchronization on a machine without a GPU.

One CTA: a producer thread and two consumer warpgroups walk the same (tile, k tile) sequence
through kStages shared-memory stages, each stage with a "full" and an "empty" mbarrier,
exactly as the kernel's code does (stage st, parity, advance(); the producer waits empty with
parity ^ 1, announces the stage's bytes with arrive.expect_tx and issues two TMA copies; a
consumer waits full with parity, issues its wgmma batch on the stage, commits, waits until at
most one batch is pending, then releases the previous k tile's stage, and the last one after
wait_group 0 at the end of a tile).

The asynchronous parts are events a random scheduler runs at any later time: each TMA copy
lands (writes its half of the stage, then completes its bytes on the full barrier), and each
wgmma batch reads its stage (A and B halves) at some point before it completes. mbarrier
semantics follow the PTX ISA: a phase completes when its pending arrivals and its transaction
count both reach zero; try_wait.parity(P) succeeds when the barrier's current phase parity
differs from P (so a waiter two phases behind would alias: the protocol must never allow it).

Checks, over many random interleavings and ring / tile / k-tile counts: no deadlock; every
wgmma read sees the stage holding both halves of the (tile, k tile) it multiplies; no TMA
write lands in a stage that a wgmma batch has yet to read. Mutations of the protocol (wrong
producer parity, releasing the current stage instead of the previous one, no wait before the
release, one arrival too few on the empty barrier) must each be caught.

Run: python3 dev/lane_models/w8a8_tma_ring.py   (standard library only; not part of the test suite)
"""

from __future__ import annotations

import random

STAGE_BYTES = 2  # two TMA copies per stage, one "byte" each: only the count matters


class Barrier:
    def __init__(self, count: int):
        self.count = count
        self.pending = count
        self.tx = 0
        self.phase = 0

    def _check(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def arrive(self):
        self.pending -= 1
        assert self.pending >= 0, "more arrivals than the barrier counts"
        self._check()

    def arrive_expect_tx(self, n: int):
        self.tx += n
        self.arrive()

    def complete_tx(self, n: int):
        self.tx -= n
        self._check()

    def try_wait(self, parity: int) -> bool:
        return (self.phase & 1) != parity


class Fail(Exception):
    pass


def run(stages: int, tiles: int, ktiles: int, rng: random.Random, mut: str = "") -> None:
    """One CTA's whole run under a random schedule; raises Fail on a violated check."""
    full = [Barrier(1) for _ in range(stages)]
    empty = [Barrier(1 if mut == "one_arrival" else 2) for _ in range(stages)]
    content = [[None, None] for _ in range(stages)]  # what each half of a stage holds
    unread = [0] * stages  # wgmma batches issued on the stage that have not read it yet
    events = []  # pending asynchronous work: callables

    def producer():
        st, parity = 0, 0
        for tile in range(tiles):
            for kt in range(ktiles):
                want = parity if mut == "producer_parity" else parity ^ 1
                while not empty[st].try_wait(want):
                    yield
                full[st].arrive_expect_tx(STAGE_BYTES)
                for half in (0, 1):
                    def land(st=st, half=half, tag=(tile, kt)):
                        if unread[st]:
                            raise Fail(f"TMA write into stage {st} before a wgmma batch read it")
                        content[st][half] = tag
                        full[st].complete_tx(1)
                    events.append(land)
                yield
                st += 1
                if st == stages:
                    st, parity = 0, parity ^ 1

    def consumer(cw: int):
        st, parity = 0, 0
        groups = []  # this warpgroup's committed batches: [done] flags, oldest first
        for tile in range(tiles):
            prev = -1
            for kt in range(ktiles):
                while not full[st].try_wait(parity):
                    yield
                group = {"done": False}
                unread[st] += 1

                def read(st=st, tag=(tile, kt), group=group):
                    if content[st] != [tag, tag]:
                        raise Fail(f"consumer {cw} read stage {st} holding {content[st]}, wanted {tag}")
                    unread[st] -= 1
                    group["done"] = True
                events.append(read)
                groups.append(group)
                # wgmma.wait_group 1: every batch but the newest has completed (batches may
                # finish out of order here; the wait is on the older ones, as in the PTX ISA)
                keep = 2 if mut == "no_wait" else 1
                while not all(g["done"] for g in groups[:-keep]):
                    yield
                release = st if mut == "release_current" else prev
                if release >= 0:
                    empty[release].arrive()
                prev = st
                yield
                st += 1
                if st == stages:
                    st, parity = 0, parity ^ 1
            while not all(g["done"] for g in groups):  # wait_group 0
                yield
            if prev >= 0:
                empty[prev].arrive()
            yield

    agents = [producer(), consumer(0), consumer(1)]
    live = list(agents)
    stalls = 0
    while live or events:
        choices = len(live) + len(events)
        i = rng.randrange(choices)
        if i < len(live):
            agent = live[i]
            try:
                next(agent)
            except StopIteration:
                live.remove(agent)
            stalls += 1
        else:
            events.pop(i - len(live))()
            stalls = 0
        if stalls > 10000 and not events:
            raise Fail("deadlock: every agent waits and nothing is in flight")


def check(stages: int, tiles: int, ktiles: int, seeds: int, mut: str = "") -> str:
    """'' if every schedule passed, else the first failure."""
    for seed in range(seeds):
        try:
            run(stages, tiles, ktiles, random.Random(seed), mut)
        except (Fail, AssertionError) as e:
            return f"seed {seed}: {e}"
    return ""


def main() -> int:
    ok = True
    # the kernel's rings (4 stages at BN = 256, 6 at 128) and a few others; tiles per CTA from
    # 1 to 5, k tiles per tile from 1 (K <= 128) to more than the ring
    for stages in (2, 4, 6):
        for tiles, ktiles in ((1, 1), (1, 9), (3, 1), (4, 9), (5, 4), (2, 32)):
            err = check(stages, tiles, ktiles, seeds=300)
            ok &= not err
            print(f"stages={stages} tiles={tiles} ktiles={ktiles}: {'ok' if not err else 'FAIL ' + err}")
    for mut in ("producer_parity", "release_current", "no_wait", "one_arrival"):
        err = check(4, 3, 9, seeds=60, mut=mut)
        ok &= bool(err)
        print(f"mutation {mut}: {'caught (' + err + ')' if err else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
