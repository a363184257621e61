"""MP ingestion timings, offline, through the tests' fake MPRester (real recorded MP data, see tests/fakes).

    .venv/bin/python benchmarks/bench_mp_ingest.py [--latency 0.05] [--repeat 1]

Measured in one run, on Li-Fe-O + Li-Ni-O + Si (GGA_GGA+U and R2SCAN entries, their task trajectories):

* write batching: one Parquet part + state save per unit of work (``flush_units=1``, the baseline) vs the default
  (``flush_units=25``), one worker, no simulated latency: the cost of the storage layer;
* parallelism: ``max_workers`` 1 (baseline) vs 4 with ``--latency`` seconds of simulated network latency per call.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

from pipeline.config import shared_data_dir
from pipeline.sources.mp import MPIngest
from pipeline.sources.mp.mp_client import MPResterClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fakes.mp_client import FakeMPRester, recorded_mp  # test fakes live beside the tests

SYSTEMS = ["Li-Fe-O", "Li-Ni-O", "Si"]


def timed_run(data, repeat: int, **kwargs) -> tuple[float, object]:
    best, report = float("inf"), None
    latency = kwargs.pop("latency", 0.0)
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            client = MPResterClient(FakeMPRester(data=data, latency=latency))
            t0 = time.perf_counter()
            report = MPIngest(tmp, client, thermo_types=("GGA_GGA+U", "R2SCAN"), **kwargs).run(SYSTEMS)
            best = min(best, time.perf_counter() - t0)
    return best, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")

    t0 = time.perf_counter()
    data = recorded_mp(shared_data_dir())
    print(f"fake data build: {time.perf_counter() - t0:.1f} s")

    base, report = timed_run(data, args.repeat, max_workers=1, flush_units=1)
    batched, _ = timed_run(data, args.repeat, max_workers=1)
    print(f"run: {report.summary()}")
    print(
        f"write per unit (flush_units=1): {base:.2f} s; batched (flush_units=25): {batched:.2f} s; "
        f"speed-up x{base / batched:.2f}"
    )

    serial, _ = timed_run(data, args.repeat, max_workers=1, latency=args.latency)
    parallel, _ = timed_run(data, args.repeat, max_workers=4, latency=args.latency)
    print(
        f"latency {args.latency:.3f} s/call: 1 worker {serial:.2f} s; 4 workers {parallel:.2f} s; "
        f"speed-up x{serial / parallel:.2f}"
    )


if __name__ == "__main__":
    main()
