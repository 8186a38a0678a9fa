"""The cloud side: the tail runner, sessions and (later) the gRPC service."""
