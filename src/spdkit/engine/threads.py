"""Processes that share a machine's cores: how many threads each, and how long they spin.

torch's CPU kernels run on OpenMP threads that spin-wait at every barrier before they sleep
(libgomp: 300 000 spins by default). When more threads want the cores than there are cores, a
spinning thread holds the core its descheduled peer needs, and every barrier waits for the
scheduler: on a 2-core machine two runs with 2 threads each, or one run next to a busy core,
took many times longer per step than one alone (figures in docs/distributed.md, "Cores").

Two remedies, neither of which changes a result:
* processes that spdkit starts together split the cores (`threads_per_process`): torchrun
  ranks (`--nproc`) and `spdkit sweep --jobs`;
* a short spin (`SPIN_COUNT`, set as GOMP_SPINCOUNT before torch is first imported, unless the
  environment sets it; the command line does it on import, a library user may call
  `set_short_spin()` first): a waiting thread soon yields its core. No spin at all
  (OMP_WAIT_POLICY=PASSIVE) slows a lone toy run most; a short spin costs it less, and a run
  next to a busy core and two runs side by side regain most of their speed (docs/distributed.md).

The thread count is not chosen from the machine's current load: a different thread count can
change float summation order, and a run resumed on a busier machine must still continue
bit-exactly.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "1000"


def set_short_spin() -> bool:
    """GOMP_SPINCOUNT = SPIN_COUNT unless set already; only before torch (libgomp reads it
    when it loads). Returns whether it was set here."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_process(processes: int) -> int:
    """cores / processes (at least 1): the share of each of `processes` on this machine."""
    return max(1, usable_cores() // max(1, processes))
