"""Validates OTLP/JSON request bodies against OpenTelemetry's own protobuf definitions
(the opentelemetry-proto package): every field name, type and enum must parse strictly.

usage: validate_otlp.py FILE...   (each file: one body; its name says traces/metrics/logs)
"""
import json
import re
import sys

from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

KINDS = {"traces": ExportTraceServiceRequest, "metrics": ExportMetricsServiceRequest, "logs": ExportLogsServiceRequest}

counts = {}
for path in sys.argv[1:]:
    kind = next(k for k in KINDS if k in path.rsplit("/", 1)[-1])
    text = open(path).read()
    msg = json_format.Parse(text, KINDS[kind](), ignore_unknown_fields=False)
    if kind == "traces":
        # OTLP/JSON writes ids as lowercase hex (protobuf's own JSON mapping would read them
        # as base64), so their form is checked on the raw JSON.
        for rs in json.loads(text)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for sp in ss["spans"]:
                    assert re.fullmatch(r"[0-9a-f]{32}", sp["traceId"]), sp["traceId"]
                    assert re.fullmatch(r"[0-9a-f]{16}", sp["spanId"]), sp["spanId"]
                    assert re.fullmatch(r"[0-9a-f]{16}", sp.get("parentSpanId", "0" * 16))
                    assert int(sp["endTimeUnixNano"]) >= int(sp["startTimeUnixNano"])
    counts[kind] = counts.get(kind, 0) + 1
print("valid OTLP:", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
