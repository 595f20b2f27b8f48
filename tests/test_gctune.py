"""valise.gctune: the collector settings both daemons take once they serve (process-wide, so checked in a child)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import gc, weakref
    gc.disable()                    # no automatic collection may free the cycle below before the call under test
    from valise import gctune

    class Cycle:
        pass

    garbage = Cycle()
    garbage.self = garbage          # start-up garbage: only the collector frees a cycle
    freed = []
    weakref.finalize(garbage, freed.append, True)
    del garbage
    kept = [Cycle() for _ in range(1000)]  # start-up state that lives as long as the process
    before = gc.get_freeze_count()
    gctune.settle_for_serving()
    young, middle, old = gc.get_threshold()
    print(freed == [True], before, gc.get_freeze_count() >= before + len(kept), young, middle, old)
    """
)


def test_settle_for_serving_frees_startup_garbage_freezes_the_rest_and_collects_the_young_rarely() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
    freed, before, frozen, young, middle, old = out
    assert freed == "True"  # collected first: garbage from start-up is not frozen for good
    assert before == "0"
    assert frozen == "True"  # what existed is in the permanent generation: full collections skip it
    assert int(young) == 20_000
    assert (int(middle), int(old)) == (10, 10)  # the older generations' thresholds are left as they were
