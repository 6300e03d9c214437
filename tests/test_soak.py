"""The long fault soak: random fault rounds for minutes, then the history check.

Not part of the default run (it is deselected by the ``soak`` marker)::

    HERALD_SOAK_SECONDS=600 python -m pytest -m soak -s

It prints the report and writes it to bench/results/soak-<UTC time>.json.
HERALD_FAULT_SEED picks the seed, so a failing run can be replayed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson
import pytest

from tests.chaos import FAULT_KINDS, FaultHarness
from tests.conftest import PROJECT_ROOT, HeraldSystem


@pytest.mark.soak
@pytest.mark.timeout(0)
def test_soak_random_faults(herald: HeraldSystem, tmp_path: Path) -> None:
    seconds = float(os.environ.get("HERALD_SOAK_SECONDS", "600"))
    seed = int(os.environ.get("HERALD_FAULT_SEED", str(int(time.time()))))
    harness = FaultHarness(herald, tmp_path, seed=seed)
    try:
        harness.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            # Shuffled cycles: every kind comes up equally often, and one process is
            # not killed so often that the launcher rightly gives up on it.
            kinds = list(FAULT_KINDS)
            harness.rng.shuffle(kinds)
            for kind in kinds:
                if time.monotonic() >= deadline:
                    break
                harness.run_rounds([kind], steady_s=(1.0, 4.0))
        report = harness.finish()
    finally:
        harness.close()
    print(report.summary())
    results = PROJECT_ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"soak-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_bytes(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2))
    print(f"report written to {path}")
    assert not any(report.missing.values()), f"acknowledged messages lost: {report.missing}"
    assert not any(report.unknown.values()), f"delivered ids that were never published: {report.unknown}"
