"""Long property-based fuzzing runs of both services' OpenAPI documents (Schemathesis).

    python bench/api_fuzz.py [--examples 200] [--seed N] [--runs 1] [--json PATH]
        [--embedding-url URL --clustering-url URL] [--only embedding|clustering]

The same run as ``tests/test_api_fuzz.py`` with more examples per operation
(the test uses 5) and, by default, a fresh seed per run: the embedding
service on ``random:tiny`` weights and the clustering service on an embedded
PostgreSQL in a temporary directory are started here (the test helpers'
processes), or the services at the given URLs are used. The clustering
service is seeded with a dataset, a model with two versions, an alias and
finished jobs whose ids are bound to half of the generated parameters.

Every operation gets the examples, coverage, fuzzing and stateful phases with
the checks not_a_server_error, status_code_conformance,
content_type_conformance, response_headers_conformance and
response_schema_conformance. Prints one line per service and run (cases,
stateful scenarios, seconds, failures) and the failing operations with
Schemathesis' report (curl commands to reproduce); exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.api_fuzz import FuzzResult, run_schemathesis, seed_clustering  # noqa: E402
from tests.support.clustering import Clustering  # noqa: E402
from tests.support.processes import ServiceProcess, private_dir, stop_postmaster  # noqa: E402


@contextlib.contextmanager
def services(args: argparse.Namespace) -> Iterator[tuple[str, Clustering | None, str | None]]:
    """(embedding URL, clustering process or None, clustering URL or None)."""
    if args.embedding_url:
        yield args.embedding_url, None, args.clustering_url
        return
    embedding = ServiceProcess(
        "embedding_service",
        *("--model", "random:tiny", "--batch-size", "4"),
        env_prefix="EMBEDDING_",
        env={"EMBEDDING_NUM_THREADS": "1", "EMBEDDING_PREPROCESS_WORKERS": "1"},
    )
    data_dir = private_dir("dinocluster-fuzz-")
    clustering = Clustering(embedding.url, data_dir=data_dir)
    try:
        embedding.start().wait_ready(180)
        if args.only != "embedding":
            clustering.start().wait_ready(180)
        yield embedding.url, clustering, clustering.url
    finally:
        clustering.close()
        embedding.close()
        stop_postmaster(data_dir / "postgres")
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="examples per operation")
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh one per run")
    parser.add_argument("--runs", type=int, default=1, help="runs per service")
    parser.add_argument("--only", choices=["embedding", "clustering"], default=None)
    parser.add_argument("--embedding-url", default=None)
    parser.add_argument("--clustering-url", default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if bool(args.embedding_url) != bool(args.clustering_url) and args.only is None:
        parser.error("give both --embedding-url and --clustering-url (or --only)")

    results: list[FuzzResult] = []
    with (
        services(args) as (embedding_url, clustering, clustering_url),
        tempfile.TemporaryDirectory(prefix="api-fuzz-") as work,
    ):
        known: dict[str, list[Any]] | None = None
        if args.only != "embedding" and clustering_url:
            import httpx

            with httpx.Client(base_url=clustering_url, timeout=120) as client:
                known = seed_clustering(client)
        for run in range(args.runs):
            seed = None if args.seed is None else args.seed + run
            targets = [("embedding", embedding_url, None), ("clustering", clustering_url, known)]
            for name, url, values in targets:
                if url is None or args.only not in (None, name):
                    continue
                result = run_schemathesis(
                    name,
                    url,
                    Path(work) / f"{name}-{run}",
                    max_examples=args.examples,
                    seed=seed,
                    known=values,
                    timeout=3600,
                )
                results.append(result)
                print(result.summary(), flush=True)
                if not result.passed:
                    print(result.output[-20000:], flush=True)
        if clustering is not None and "Traceback" in clustering.output():
            print("the clustering service logged a traceback:\n" + clustering.output()[-8000:])
            results.append(FuzzResult("clustering-log", 1, clustering.output(), 0.0))

    total = sum(r.cases for r in results)
    failed = [r for r in results if not r.passed]
    print(f"total: {total} cases, {sum(r.scenarios for r in results)} stateful scenarios, "
          f"{len(failed)} failed runs")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {k: getattr(r, k) for k in ("service", "cases", "scenarios", "seconds", "failures")}
            for r in results
        ]
        args.json.write_text(json.dumps({"examples": args.examples, "runs": rows}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
