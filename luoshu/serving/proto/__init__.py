"""The Open Inference Protocol's gRPC definition (`grpc_predict_v2.proto`) and the Python stubs generated from it.

The stubs are checked in, made by `python -m luoshu.serving.proto` with grpcio-tools 1.81.1
(protobuf 6.33 gencode), so they run on the pinned runtime (grpcio>=1.81.1, protobuf 6.33.x)
without a build step. Two rewrites follow the generator: the service module imports its
messages relatively (the package is not on sys.path), and the messages live in a private
descriptor pool, because Triton's client registers the same `inference.*` names in protobuf's
default pool and a process may hold both.
"""
