"""The prepare driver's work per source file in an object store, before any Ray task runs: each
file is checked (`cluster.data.files.check_file`: its first 8 KiB, or a Parquet footer) and sized
(`file_size`, for the byte-range parts). Each is a request or two, so what it costs is the store's
round trip times the number of files.

- baseline: one file at a time, as raylm did before sources could be URIs (and it checked every
  file twice: in `corpus.check_sources` and again in `sources.file_dataset`).
- raylm: `check_files` and `file_parts` (both through `sources.map_files`, 16 threads), once.

The store is moto's S3 server in this process (the test suite's), with a fixed delay added to every
request to stand in for a remote store's round trip; with no delay the 2-core VM's moto server is the
bottleneck for both sides.

    python -m bench.source_checks [--files 200] [--delay-ms 30]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

DELAY_S = [0.0]  # added to every request the server answers; set after the upload


def _slow_moto(port: int):
    """moto's threaded S3 server, answering each request DELAY_S[0] late."""
    import moto.moto_server.threaded_moto_server as threaded
    from moto.server import ThreadedMotoServer

    base = threaded.DomainDispatcherApplication

    class Delayed(base):
        def __call__(self, environ, start_response):
            time.sleep(DELAY_S[0])
            return super().__call__(environ, start_response)

    threaded.DomainDispatcherApplication = Delayed
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    return server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--delay-ms", type=float, default=30.0)
    args = p.parse_args()

    from cluster.runtime import free_ports

    (port,) = free_ports(1)
    server = _slow_moto(port)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    try:
        import boto3

        from cluster import storage
        from cluster.data.files import check_file, check_files, file_size
        from cluster.data.sources import SourceConfig, expand_paths, file_parts

        boto3.client("s3").create_bucket(Bucket="raylm-bench")
        for i in range(args.files):
            storage.write_bytes_atomic(f"s3://raylm-bench/raw/f{i:05d}.jsonl", b'{"text": "a document"}\n' * 20)
        DELAY_S[0] = args.delay_ms / 1000  # from now on: the upload above is not measured
        files = expand_paths(["s3://raylm-bench/raw/*.jsonl"], "bench")
        source = SourceConfig(kind="files", paths=files)

        t0 = time.perf_counter()
        for _ in range(2):
            for path in files:
                check_file(path, "text")
        for path in files:
            file_size(path)
        t1 = time.perf_counter()
        check_files(files, "text")
        file_parts(files, source, 0, 8 << 20)
        t2 = time.perf_counter()
    finally:
        server.stop()
    old, new = t1 - t0, t2 - t1
    print(f"{len(files)} files in S3, {args.delay_ms:.0f} ms per request: one at a time, checked twice {old:.2f} s; "
          f"raylm {new:.2f} s; ratio {old / new:.1f}x")


if __name__ == "__main__":
    main()
