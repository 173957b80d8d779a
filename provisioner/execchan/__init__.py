"""The `serial` exec method: run a job inside a guest over its own virtio-serial channel."""

from provisioner.execchan.client import (
    EXEC_PORT_NAME,
    ExecResult,
    StreamResult,
    run_in_guest,
    stream_in_guest,
)

__all__ = ["EXEC_PORT_NAME", "ExecResult", "StreamResult", "run_in_guest", "stream_in_guest"]
