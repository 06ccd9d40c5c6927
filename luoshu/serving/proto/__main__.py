"""Regenerates the checked-in gRPC stubs from grpc_predict_v2.proto (needs grpcio-tools, the `test` extra)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "grpc_predict_v2.proto"
OUTPUTS = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py")
_REWRITES = {
    "grpc_predict_v2_pb2.py": [("_descriptor_pool.Default()", "_descriptor_pool.DescriptorPool()")],
    "grpc_predict_v2_pb2_grpc.py": [("import grpc_predict_v2_pb2 as", "from . import grpc_predict_v2_pb2 as")],
}


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc on the .proto into `out_dir`, applies the rewrites, returns the files written."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{HERE}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", str(HERE / PROTO)]
        status = protoc.main(args)
        if status != 0:
            raise SystemExit(f"protoc failed with status {status}")
        written = []
        for name in OUTPUTS:
            text = (Path(tmp) / name).read_text()
            for old, new in _REWRITES[name]:
                if old not in text:
                    raise SystemExit(f"{name}: the generator's output changed, {old!r} not found")
                text = text.replace(old, new)
            (out_dir / name).write_text(text)
            written.append(out_dir / name)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)
