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

Clusters of CL = 2 or 4 CTAs (LOWBIT_CUDA_W8A8=cluster / cluster4): each CTA's producer copies
its own A and one CL-th of the shared B box, the piece landing in every CTA's stage (multicast)
and counted on each CTA's full barrier, which expects all 1 + CL pieces; consumers release a
stage on the empty barrier of every CTA (count 2 x CL). A complete_tx may reach a barrier before its
own producer's expect_tx (the transaction count goes negative; the pending arrival holds the
phase), as the PTX ISA allows.

Checks, over many random interleavings and ring / tile / k-tile counts, for one CTA and for
clusters of two and four: no deadlock; every wgmma read sees the stage holding every piece of the
(tile, k tile) it multiplies; no TMA write lands in a stage that a wgmma batch has yet to
read. Mutations of the protocol (wrong producer parity, releasing the current stage instead
of the previous one, no wait before the release, one arrival too few on the empty barrier;
for clusters also releasing only the own CTA's stage, with or without the count lowered to
match, and a full barrier expecting only the own producer's bytes) must each be caught.

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


def run(stages: int, tiles: int, ktiles: int, rng: random.Random, mut: str = "", cl: int = 1) -> None:
    """A cluster of `cl` CTAs (1: the plain kernel) under a random schedule; raises Fail on a
    violated check. Each stage holds A (the CTA's own) and cl pieces of B; with cl > 1 the
    producer of CTA c copies piece c into the stage of every CTA (multicast)."""
    pieces = 1 + cl
    empty_count = (1 if mut == "one_arrival" else 2) * (1 if mut == "local_release_count" else cl)
    full = [[Barrier(1) for _ in range(stages)] for _ in range(cl)]
    empty = [[Barrier(empty_count) for _ in range(stages)] for _ in range(cl)]
    content = [[[None] * pieces for _ in range(stages)] for _ in range(cl)]  # what each piece holds
    unread = [[0] * stages for _ in range(cl)]  # wgmma batches issued on the stage, not yet read
    events = []  # pending asynchronous work: callables

    def land(d, st, piece, tag):  # a TMA copy (piece of stage st of CTA d) arrives
        if unread[d][st]:
            raise Fail(f"TMA write into CTA {d} stage {st} before a wgmma batch read it")
        content[d][st][piece] = tag
        full[d][st].complete_tx(1)

    def producer(c: int):
        st, parity = 0, 0
        for tile in range(tiles):
            for kt in range(ktiles):
                want = parity if mut == "producer_parity" else parity ^ 1
                while not empty[c][st].try_wait(want):
                    yield
                full[c][st].arrive_expect_tx(2 if mut == "expect_own_bytes" else pieces)
                events.append(lambda st=st, tag=(tile, kt, c): land(c, st, 0, tag))  # A: this CTA's rows
                for d in range(cl):  # B: piece c of the shared weight rows, into every CTA
                    events.append(lambda d=d, st=st, tag=(tile, kt): land(d, st, 1 + c, tag))
                yield
                st += 1
                if st == stages:
                    st, parity = 0, parity ^ 1

    def consumer(c: int, cw: int):
        st, parity = 0, 0
        groups = []  # this warpgroup's committed batches: [done] flags, oldest first

        def release(stage):
            for d in ([c] if mut.startswith("local_release") else range(cl)):
                empty[d][stage].arrive()
        for tile in range(tiles):
            prev = -1
            for kt in range(ktiles):
                while not full[c][st].try_wait(parity):
                    yield
                group = {"done": False}
                unread[c][st] += 1

                def read(st=st, want=[(tile, kt, c)] + [(tile, kt)] * cl, group=group):
                    if content[c][st] != want:
                        raise Fail(f"CTA {c} consumer {cw} read stage {st} holding {content[c][st]}, wanted {want}")
                    unread[c][st] -= 1
                    group["done"] = True
                events.append(read)
                groups.append(group)
                # wgmma.wait_group 1: every batch but the newest has completed (batches may
                # finish out of order here; the wait is on the older ones, as in the PTX ISA)
                keep = 2 if mut == "no_wait" else 1
                while not all(g["done"] for g in groups[:-keep]):
                    yield
                stage = st if mut == "release_current" else prev
                if stage >= 0:
                    release(stage)
                prev = st
                yield
                st += 1
                if st == stages:
                    st, parity = 0, parity ^ 1
            while not all(g["done"] for g in groups):  # wait_group 0
                yield
            if prev >= 0:
                release(prev)
            yield

    agents = [producer(c) for c in range(cl)] + [consumer(c, cw) for c in range(cl) for cw in (0, 1)]
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


def check(stages: int, tiles: int, ktiles: int, seeds: int, mut: str = "", cl: int = 1) -> str:
    """'' if every schedule passed, else the first failure."""
    for seed in range(seeds):
        try:
            run(stages, tiles, ktiles, random.Random(seed), mut, cl)
        except (Fail, AssertionError) as e:
            return f"seed {seed}: {e}"
    return ""


def main() -> int:
    ok = True
    # the kernel's rings (4 stages at BN = 256, 6 at 128) and a few others; tiles per CTA from
    # 1 to 5, k tiles per tile from 1 (K <= 128) to more than the ring; single CTAs and
    # clusters of two and four (LOWBIT_CUDA_W8A8=cluster / cluster4)
    for cl in (1, 2, 4):
        for stages in (2, 4, 6):
            for tiles, ktiles in ((1, 1), (1, 9), (3, 1), (4, 9), (5, 4), (2, 32)):
                err = check(stages, tiles, ktiles, seeds={1: 300, 2: 150, 4: 60}[cl], cl=cl)
                ok &= not err
                print(f"cl={cl} stages={stages} tiles={tiles} ktiles={ktiles}: {'ok' if not err else 'FAIL ' + err}")
    mutations = [(m, 1) for m in ("producer_parity", "release_current", "no_wait", "one_arrival")]
    mutations += [(m, cl) for cl in (2, 4) for m in ("producer_parity", "release_current", "no_wait",
                                                     "local_release", "local_release_count", "expect_own_bytes")]
    for mut, cl in mutations:
        err = check(4, 3, 9, seeds=60, mut=mut, cl=cl)
        ok &= bool(err)
        print(f"mutation {mut} (cl={cl}): {'caught (' + err + ')' if err else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
