"""Shared by the luoshu.train tests: a tiny CTR dataset, readers of a job's metrics.csv, TensorBoard events
and checkpoint arrays, and a stand-in for Ctrl-C at a chosen step."""

import csv
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tensorboardX.proto.event_pb2 import Event, SessionLog

import luoshu as ls

TINY_CTR = {"num_samples": 3000, "eval_samples": 1000, "num_slots": 6, "max_slot_size": 50}


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: the TFRecord checksum, written here independently of tensorboardX."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path: Path) -> list:
    """The events of one TFRecord file, checking each record's framing and CRCs."""
    raw, pos, events = path.read_bytes(), 0, []
    while pos < len(raw):
        header = raw[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", raw[pos + 8:pos + 12])[0] == _masked(_crc32c(header))
        data = raw[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])[0] == _masked(_crc32c(data))
        pos += 16 + length
        events.append(Event.FromString(data))
    return events


def read_scalars(job: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the job's TensorBoard event files, as TensorBoard shows them: files in time order,
    and a SessionLog START at step s (a resumed run) drops the points logged earlier at steps >= s."""
    files = [_records(f) for f in job.glob("events.out.tfevents.*")]
    assert files, f"no event file in {job}"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(files, key=lambda events: events[0].wall_time):
        for event in events:
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                scalars = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def interrupt_after(monkeypatch, steps: int):
    """Makes the trainer's graph raise KeyboardInterrupt (as Ctrl-C would) when step `steps + 1` starts."""
    calls = {"n": 0}
    original = ls.Graph.run

    def run(self, fetches, feed_dict=None):
        if isinstance(fetches, list) and len(fetches) == 2:  # [loss, train_op]: a training step
            calls["n"] += 1
            if calls["n"] > steps:
                raise KeyboardInterrupt
        return original(self, fetches, feed_dict)

    monkeypatch.setattr(ls.Graph, "run", run)


def checkpoint_arrays(checkpoint: Path) -> dict[str, np.ndarray]:
    out = {f"w.{k}": v for k, v in load_file(checkpoint / "weights.safetensors").items()}
    out.update({f"opt.{k}": v for k, v in load_file(checkpoint / "optimizer.safetensors").items()})
    return out
