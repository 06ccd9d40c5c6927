"""Who may talk to a parameter server: CURVE keys derived from the job's secret, checked by a ZAP handler.

Every process of a job shares one secret (`LUOSHU_JOB_SECRET`: the launcher creates it;
`start_local_servers` creates one for its subprocesses). From it both sides derive, with
HMAC-SHA256 as HKDF's extract-and-expand step, two fixed CURVE key pairs: the servers' and
the clients'. A server socket is a CURVE server with the derived server key, and its ZAP
handler admits only the derived client public key; a client connects with the derived
client pair and the server's public key. A peer without the secret cannot complete the
handshake: nothing it sends reaches the request loop (ZeroMQ drops the connection), and
the server counts it (`refused_connections` in its stats). Traffic is encrypted too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets as _secrets
import threading

from luoshu.distributed.env import JOB_SECRET_ENV as SECRET_ENV

_ZAP_ENDPOINT = "inproc://zeromq.zap.01"


def new_secret() -> str:
    """A fresh per-job secret (256 random bits, hex)."""
    return _secrets.token_hex(32)


def job_secret() -> str | None:
    """The job's secret from the environment, or None (then sockets are unauthenticated)."""
    return os.environ.get(SECRET_ENV) or None


def _derive(secret: str, role: str) -> bytes:
    """A Z85 CURVE secret key for `role`, a pure function of the job secret (HKDF-SHA256, one block)."""
    from zmq.utils import z85

    prk = hmac.new(b"luoshu-ps-v1", secret.encode(), hashlib.sha256).digest()
    okm = hmac.new(prk, f"curve {role} key".encode() + b"\x01", hashlib.sha256).digest()
    return z85.encode(okm)


def keypair(secret: str, role: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 CURVE keys of `role` ("server" or "client") for the job `secret`."""
    import zmq

    private = _derive(secret, role)
    return zmq.curve_public(private), private


def secure_server(sock, secret: str | None) -> None:
    """Makes a ROUTER socket (before it binds) a CURVE server for the job `secret`; no-op without one."""
    if not secret:
        return
    _, private = keypair(secret, "server")
    sock.curve_server = True
    sock.curve_secretkey = private
    sock.zap_domain = b"luoshu-ps"


def secure_client(sock, secret: str | None) -> None:
    """Makes a DEALER socket (before it connects) a CURVE client for the job `secret`; no-op without one."""
    if not secret:
        return
    public, private = keypair(secret, "client")
    sock.curve_serverkey = keypair(secret, "server")[0]
    sock.curve_publickey = public
    sock.curve_secretkey = private


class Authenticator:
    """The ZAP handler of one ZeroMQ context: admits CURVE clients holding the job's client key.

    ZeroMQ asks it about every CURVE handshake on that context's sockets; it answers 200 for
    the derived client key and 400 for anything else, counting the refusals (`refused`).
    """

    def __init__(self, ctx, secret: str):
        import zmq

        self.allowed = keypair(secret, "client")[0]
        self.refused = 0
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.bind(_ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="luoshu-ps-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from zmq.utils import z85

        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            try:
                frames = self._sock.recv_multipart()
                version, request_id, _domain, _address, _identity, mechanism = frames[:6]
                credentials = frames[6:]
                ok = mechanism == b"CURVE" and len(credentials) == 1 and z85.encode(credentials[0]) == self.allowed
                if not ok:
                    self.refused += 1
                status, text = (b"200", b"OK") if ok else (b"400", b"not a member of this job")
                self._sock.send_multipart([version, request_id, status, text, b"", b""])
            except Exception:  # noqa: BLE001 - a malformed ZAP request: answer nothing, keep serving
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close(linger=0)
