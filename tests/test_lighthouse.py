"""The torchft Lighthouse's watch and the crash line it leaves (no Ray: a real socket and a
real run directory; the Ray runs are in ``test_replicas.py``)."""

from __future__ import annotations

import socket
import threading

from raydrat.ray_train.lighthouse import LOST_FILE, LighthouseWatch, crash_cause


def _listener() -> tuple[socket.socket, str]:
    sock = socket.create_server(("127.0.0.1", 0))
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_the_watch_gives_up_only_once_the_lighthouse_stopped_answering(tmp_path):
    sock, address = _listener()
    gone = threading.Event()
    watch = LighthouseWatch(str(tmp_path), address, gone_after_s=2.0, on_gone=gone.set).start()
    assert not gone.wait(3.5)  # answering: never given up on
    sock.close()
    assert gone.wait(6.0)  # closed: given up within gone_after_s and a check or two
    watch.stop()


def test_a_stopped_watch_never_gives_up(tmp_path):
    sock, address = _listener()
    gone = threading.Event()
    watch = LighthouseWatch(str(tmp_path), address, gone_after_s=1.0, on_gone=gone.set).start()
    watch.stop()
    sock.close()
    assert not gone.wait(3.0)


def test_the_crash_line_names_the_lighthouse_only_for_the_replica_that_gave_up(tmp_path):
    (tmp_path / LOST_FILE.format(pid=4242)).write_text("gone\n")
    died = RuntimeError(
        "The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n\tpid: 4242\n"
    )
    wrapped = RuntimeError("worker group failed")
    wrapped.__cause__ = died
    line = crash_cause(tmp_path, wrapped)
    assert line is not None and line.startswith("the torchft Lighthouse actor died and no restart was left")
    assert "replica pid 4242" in line and "train.max_failures" in line
    other = RuntimeError("The actor died unexpectedly before finishing this task.\n\tpid: 42421\n")
    assert crash_cause(tmp_path, other) is None  # another process's death is described as before
