#!/usr/bin/env bash
# Regenerate src/splitlm/proto/*_pb2*.py from splitlm.proto (needs grpcio-tools; the
# generated modules are committed, so installing splitlm needs no build step).
set -euo pipefail
cd "$(dirname "$0")/../src"
python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. splitlm/proto/splitlm.proto
