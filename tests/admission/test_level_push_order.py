"""Level changes reach the controller's listeners in the order they happened.

The controller is driven from two threads: the shard's event loop (admit, settle, tick) and the
index builder (indexed). Each call updates the level under the controller's lock and then calls
the listeners (the shard service, which pushes a StreamStatus to every stream). If the builder
thread is descheduled between releasing the lock and calling the listeners while the loop
raises the level again, the listeners see the two changes in reverse order, and the last level
pushed to every client (and exported as ``engram_streaming_backpressure_state``) is stale until
the next change. The listener below stands in for that preemption.
"""

from __future__ import annotations

import threading

from engram.common.settings import AdmissionSettings, LaneLimits
from engram.shard import admission as adm
from engram.shard.admission import AdmissionController
from engram.v1 import streaming_pb2 as pb

MB = 1 << 20


def test_listeners_see_level_changes_in_the_order_they_happen() -> None:
    big = LaneLimits(10**9, 10**9, 1 << 50, 1 << 50)
    settings = AdmissionSettings(
        memory_budget_bytes=100 * MB, high=big, normal=big, low=big, min_dwell_s=0.0
    )
    c = AdmissionController(settings, clock=lambda: 0.0)
    c.admit(pb.PRIORITY_HIGH, 1, 0)
    c.settle(pb.PRIORITY_HIGH, 1, 0, 85 * MB)
    assert c.level == adm.CRITICAL

    in_listener, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def preempted(snap: adm.Snapshot) -> None:
        if threading.current_thread().name == "index-builder":
            in_listener.set()
            release.wait(1.0)

    c.listeners += [preempted, lambda snap: seen.append(snap.level)]
    # The builder frees 20 MB: 65 MB is below 0.8 x 0.9 of the budget, so CRITICAL -> WARNING.
    builder = threading.Thread(target=c.indexed, args=(20 * MB,), name="index-builder")
    builder.start()
    assert in_listener.wait(5)
    # Meanwhile the loop admits 20 MB: back to 85 MB, WARNING -> CRITICAL.
    loop = threading.Thread(target=c.admit, args=(pb.PRIORITY_HIGH, 1, 20 * MB), name="loop")
    loop.start()
    loop.join(0.3)
    release.set()
    builder.join(5)
    loop.join(5)
    assert not builder.is_alive() and not loop.is_alive()

    assert c.level == adm.CRITICAL
    assert seen == [adm.WARNING, adm.CRITICAL], f"listeners saw {seen}"
