"""The gRPC/protobuf contract (splitlm.proto) and its generated modules.

Regenerate with scripts/gen_proto.sh after editing the .proto; the generated
modules are committed so that installing splitlm needs no build step.
"""
