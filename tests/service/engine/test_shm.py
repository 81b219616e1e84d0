"""The corridor's shared memory: the board's shared admission, the slots' layout, the frames."""

from __future__ import annotations

import multiprocessing
import os
import socket

import numpy as np

from service.engine import wire
from service.engine.shm import Board, SlotLayout, Slots


def _hammer(fd: int, cell: int, capacity: int, rounds: int, seen: multiprocessing.Queue) -> None:
    """Admit and release as fast as possible; report the largest total seen while admitted."""
    board = Board.attach(fd, cell)
    rng = np.random.default_rng(cell)
    most = 0
    for _ in range(rounds):
        count = int(rng.integers(1, 4))
        if board.take(count, capacity):
            most = max(most, board.outstanding)
            board.give(count)
    seen.put(most)


def test_front_ends_in_separate_processes_never_admit_past_the_capacity() -> None:
    board = Board.create(generation=1)
    capacity = 5
    context = multiprocessing.get_context("fork")
    seen: multiprocessing.Queue = context.Queue()
    workers = [
        context.Process(target=_hammer, args=(board.fd, cell, capacity, 20_000, seen))
        for cell in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    most = [seen.get(timeout=5) for _ in workers]
    assert max(most) <= capacity
    assert max(most) >= capacity - 2  # they did compete for the room
    assert board.outstanding == 0


def test_a_front_ends_cell_counts_its_images_and_clearing_it_frees_them() -> None:
    board = Board.create(generation=7)
    one, two = Board.attach(board.fd, 0), Board.attach(board.fd, 1)
    assert one.take(3, 4) and not two.take(2, 4) and two.take(1, 4)
    assert board.outstanding == 4 and one.mine == 3 and two.mine == 1
    board.clear(0)  # the engine, once front end 0 is gone and none of its inputs is left
    assert two.outstanding == 1 and two.take(3, 4)
    board.publish(capacity=4, image_seconds=0.5, drain_rate=10.0)
    board.set_state("ready")
    assert (two.state, two.capacity, two.generation, two.pid) == ("ready", 4, 7, os.getpid())
    assert two.backlog_seconds(3) == 1.5 and two.drain_rate == 10.0
    board.publish(capacity=4, image_seconds=0.0, drain_rate=None)
    assert two.backlog_seconds(3) is None and two.drain_rate is None


def test_slots_hold_an_input_and_its_outputs_apart_in_memory_both_sides_see() -> None:
    layout = SlotLayout((3, 8, 6), "uint8", max_k=5, embed_dim=7, num_classes=11)
    mine = Slots.create(layout, 4, "test-slots")
    theirs = Slots.attach(os.dup(mine.fd), layout, 4)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (4, 3, 8, 6), dtype=np.uint8)
    mine.inputs[:] = crops
    np.testing.assert_array_equal(theirs.inputs, crops)
    for slot in range(4):  # the engine writes every output of every slot...
        theirs.indices[slot] = slot
        theirs.scores[slot] = slot + 0.5
        theirs.embedding[slot] = -slot
        theirs.logits[slot] = 2 * slot
    np.testing.assert_array_equal(mine.inputs, crops)  # ...and no input is touched
    assert mine.indices[3].tolist() == [3] * 5 and mine.scores[2].tolist() == [2.5] * 5
    assert mine.embedding[1].tolist() == [-1] * 7 and mine.logits[3].tolist() == [6] * 11
    assert layout.slot_bytes % 64 == 0
    assert layout.slot_bytes >= 3 * 8 * 6 + 4 * (2 * 5 + 7 + 11)
    tensors = SlotLayout((3, 8, 6), "float32", max_k=5, embed_dim=7, num_classes=11)
    assert tensors.input_bytes == 4 * layout.input_bytes


def test_a_jpeg_slot_holds_its_bytes_then_a_refusal_beside_room_for_outputs() -> None:
    layout = SlotLayout((1000,), "uint8", max_k=5, embed_dim=7, num_classes=11)
    assert SlotLayout.from_dict(layout.to_dict()) == layout
    assert layout.input_bytes == 1000
    assert layout.slot_bytes == 1152  # 1000 + 4 * (2 * 5 + 7 + 11) = 1112, to 64 bytes
    mine = Slots.create(layout, 2, "test-jpegs")
    theirs = Slots.attach(os.dup(mine.fd), layout, 2)
    data = bytes(range(256)) * 3
    mine.inputs[1, : len(data)] = np.frombuffer(data, np.uint8)
    assert bytes(theirs.inputs[1, : len(data)]) == data
    theirs.logits[1] = 3.0  # the outputs lie after the bytes, not over them
    assert bytes(mine.inputs[1, : len(data)]) == data and mine.logits[1].tolist() == [3.0] * 11
    error = wire.bad_image("CorruptImage", "the JPEG data is damaged", layout.input_bytes)
    theirs.inputs[0, : len(error)] = np.frombuffer(error, np.uint8)
    assert wire.parse_bad_image(mine.inputs[0, : len(error)]) == (
        "CorruptImage",
        "the JPEG data is damaged",
    )
    # A message too long for the room is cut, never the error's name.
    cut = wire.bad_image("CorruptImage", "x" * 5000, 1100)
    name, message = wire.parse_bad_image(cut)
    assert len(cut) <= 1100 and name == "CorruptImage" and message == "x" * 1024


def test_outputs_written_in_one_copy_read_back_where_each_part_lies() -> None:
    from service.engine.client import _ranked
    from service.postprocess import BatchOutputs, best_k, softmax

    layout = SlotLayout((3, 4, 4), "uint8", max_k=5, embed_dim=6, num_classes=9)
    engines = Slots.create(layout, 3, "test-outputs")
    fronts = Slots.attach(os.dup(engines.fd), layout, 3)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 9)).astype(np.float32)
    embedding = rng.standard_normal((2, 6)).astype(np.float32)
    fronts.inputs[:] = 7
    engines.head[1] = BatchOutputs(logits, embedding).packed(3, 5)[1]  # as the engine writes
    order = best_k(softmax(logits[1]), 3)
    scores = softmax(logits[1])[order].astype(np.float32).tolist()
    assert fronts.indices[1, :3].tolist() == order
    assert fronts.scores[1, :3].tolist() == scores
    assert fronts.embedding[1].tolist() == embedding[1].tolist()
    # What the front end reads: the k indices and scores in one unpack.
    ranked = _ranked(3, 5).unpack_from(fronts.buffer, fronts.outputs_at(1))
    assert list(ranked[:3]) == order and list(ranked[3:]) == scores
    # Nothing else moved: every input, and the other slots' outputs.
    assert (fronts.inputs == 7).all()
    assert not fronts.head[0].any() and not fronts.head[2].any() and not fronts.logits.any()


def test_frames_and_the_handshake_round_trip() -> None:
    frame = wire.submit(7, wire.TENSORS, 12, 5, wire.WANT_EMBEDDING, 123.25)
    assert len(frame) == wire.FRAME and frame[0] == wire.SUBMIT
    assert wire.SUBMIT_FRAME.unpack_from(frame) == (
        wire.SUBMIT,
        7,
        wire.TENSORS,
        12,
        5,
        wire.WANT_EMBEDDING,
        123.25,
        0,
    )
    jpeg = wire.submit(8, wire.JPEGS, 3, 5, wire.WANT_LOGITS, 9.5, 2**32 - 1)
    assert len(jpeg) == wire.FRAME
    assert wire.SUBMIT_FRAME.unpack_from(jpeg) == (
        wire.SUBMIT,
        8,
        wire.JPEGS,
        3,
        5,
        wire.WANT_LOGITS,
        9.5,
        2**32 - 1,
    )
    assert wire.parse_cancel(wire.cancel(2**32 - 1)) == 2**32 - 1
    # Seconds that float32 holds exactly (sums of powers of two), so equality is fair.
    answer = wire.result(9, wire.DEADLINE, 3, 5, 0.25, 0.5, 0.125, 2.0**-10)
    assert len(answer) == wire.FRAME and answer[0] == wire.RESULT
    assert wire.RESULT_FRAME.unpack_from(answer) == (
        wire.RESULT,
        9,
        wire.DEADLINE,
        3,
        5,
        0.25,
        0.5,
        0.125,
        2.0**-10,
    )
    # A microsecond of a few seconds' stage survives the float32 field.
    queue_s = wire.RESULT_FRAME.unpack_from(wire.result(1, wire.OK, 1, 0, 3.000001, 0.0))[5]
    assert abs(queue_s - 3.000001) < 5e-7
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    board = Board.create(generation=3)
    message = {"card": {"labels": [f"class {i}" for i in range(5000)]}, "cell": 2}
    wire.send_hello(left, message, [board.fd])
    received, fds = wire.recv_hello(right)
    assert received == message and len(fds) == 1
    assert Board.attach(fds[0], 2).generation == 3
    left.close()
    right.close()


def test_a_front_end_imports_neither_torch_nor_onnx_runtime() -> None:
    # Everything a front end process imports, in a fresh interpreter.
    import subprocess
    import sys

    code = (
        "import sys, service.cli, service.app, service.workers, service.grpc_server, "
        "service.engine.client; "
        "print(sorted(m for m in ('torch', 'onnxruntime', 'timm', 'onnx') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
