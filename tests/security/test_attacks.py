"""The attacks of ``engram.bench.attacks`` against a real cluster with keys and TLS on: every
one must get the answer a safe server gives (the table in the module's report), and a key
flooding beyond its limit must be pushed back explicitly while another key's writes go on."""

from __future__ import annotations

from pathlib import Path

import pytest

from engram.bench import attacks

pytestmark = pytest.mark.cluster


def test_every_attack_gets_the_safe_answer(tmp_path: Path) -> None:
    result = attacks.run(tmp_path, flood_seconds=2.0)
    wrong = [r for r in result["rows"] if not r["ok"]]
    assert not wrong, attacks.markdown({"rows": wrong})
    assert len(result["rows"]) == len(attacks.attacks(""))

    flood = result["flood"]
    assert flood["flood"]["rejections"] > 0, "the flooding key was never pushed back"
    # what its bucket allows: 2 s of 4 streams, plus one second's burst
    assert flood["flood"]["acked_per_s"] <= 1.6 * attacks.FLOOD_LIMIT
    for phase in ("steady_alone", "steady_beside_flood"):
        # the steady key is never refused: it keeps its pace (within a batch of rounding)
        assert flood[phase]["acked_per_s"] >= 0.9 * attacks.STEADY_RATE, flood
