"""`python -m bench.otlp_sink --port N --counts FILE`: an OTLP/HTTP trace receiver for benches.

It answers every `POST /v1/traces` with 200 and an empty `ExportTraceServiceResponse`, as a
collector that keeps up would, decodes the request (opentelemetry-proto, which the service's
exporter brings) and counts exports and spans; the counts are written to FILE, as JSON, when
it stops (SIGTERM or SIGINT). Another path answers 404. It runs as a process of its own, so
that its work shares the cores as a collector's would, and not the load generator's process.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

PATH = "/v1/traces"
_RESPONSE = ExportTraceServiceResponse().SerializeToString()


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.exports = 0
        self.spans = 0
        self.bytes = 0


def handler(counts: Counts) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != PATH:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            export = ExportTraceServiceRequest.FromString(body)
            spans = sum(
                len(scope.spans) for rs in export.resource_spans for scope in rs.scope_spans
            )
            with counts.lock:
                counts.exports += 1
                counts.spans += spans
                counts.bytes += len(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(_RESPONSE)))
            self.end_headers()
            self.wfile.write(_RESPONSE)

        def log_message(self, format: str, *args) -> None:
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_sink")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--counts", type=Path, required=True, help="JSON counts, written at exit")
    args = parser.parse_args(argv)
    counts = Counts()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(counts))
    server.daemon_threads = True

    def stop(signum, frame) -> None:
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        args.counts.write_text(
            json.dumps({"exports": counts.exports, "spans": counts.spans, "bytes": counts.bytes})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
