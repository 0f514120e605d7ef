"""``--profile DIR``: cProfile, on CPU time, in the benchmark's worker processes (the Celery parent and each
forked child), over the sustained run only.

The benchmark creates ``DIR/start`` when the sustained run begins; each process starts a fresh profile the first
time it sees the file, and writes ``DIR/<role>-<pid>.prof`` every second or so while it runs (the stack is stopped
with a signal, so no exit hook is relied on). ``python -m bench._pipeline.profiling DIR`` prints the merged profile
of every process, and of the parent and children apart.
"""
from __future__ import annotations

import cProfile
import os
import sys
import time
from pathlib import Path

PROFILE_ENV = "GESTALT_BENCH_PROFILE"


class _Profiled:
    """One process's profile, restarted when the sustained run begins and written now and then."""

    def __init__(self, out: Path, role: str):
        self.out, self.role = out, role
        self.started = False
        self.last = 0.0
        self.prof = cProfile.Profile(time.process_time)
        self.prof.enable()

    def tick(self) -> None:
        if not self.started:
            if (self.out / "start").exists():
                self.prof.disable()
                self.prof = cProfile.Profile(time.process_time)
                self.started = True
                self.prof.enable()
            return
        now = time.monotonic()
        if now - self.last >= 1.0:
            self.last = now
            self.prof.disable()
            self.prof.dump_stats(self.out / f"{self.role}-{os.getpid()}.prof")
            self.prof.enable()


def install(out: Path) -> None:
    """Profile this Celery worker's parent (its main thread, from its timer) and every child it forks."""
    from celery import signals

    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, _Profiled] = {}

    @signals.worker_process_init.connect(weak=False)
    def _child(**_):
        state["p"] = _Profiled(out, "child")  # replaces the parent's profile that the fork carried over

    @signals.task_postrun.connect(weak=False)
    def _after_task(**_):
        if "p" in state:
            state["p"].tick()

    @signals.worker_ready.connect(weak=False)
    def _parent(sender, **_):  # sender: the consumer; its timer runs in the main thread
        parent = _Profiled(out, "parent")
        sender.timer.call_repeatedly(0.5, parent.tick)


def report(out: Path, limit: int = 45) -> None:
    import pstats

    files = sorted(out.glob("*.prof"))
    for role in ("child", "parent"):
        mine = [str(f) for f in files if f.name.startswith(role)]
        if not mine:
            continue
        stats = pstats.Stats(*mine)
        print(f"===== {role}: {len(mine)} processes, {stats.total_tt:.2f} s CPU =====")
        stats.sort_stats("cumulative").print_stats(limit)
        stats.sort_stats("tottime").print_stats(limit)


if __name__ == "__main__":
    report(Path(sys.argv[1]))
