"""Control API servicers: protobuf <-> domain, errors -> gRPC status codes."""
