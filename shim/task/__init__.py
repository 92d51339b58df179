"""The Task API boundary: protobuf requests in, domain calls, protobuf replies and events out."""
