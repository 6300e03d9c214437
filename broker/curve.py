"""CURVE encryption and client authentication on the endpoints clients reach.

With ``curve_secret_key_file`` in the config, the proxy (requests, live feed)
and the senders (deliveries, acks) bind those sockets as CURVE servers with
that key pair, and a ZAP handler in each of those processes admits only the
client public keys found in ``curve_clients_dir`` (ZeroMQ certificate files,
as ``herald keys generate`` writes them), plus the server's own key, which the
launcher uses for its readiness PING. Without ``curve_clients_dir`` any client
that knows the server's public key is admitted. A refused client's handshake
fails inside libzmq: its messages never reach a Herald process.

Internal sockets stay plain: they connect processes of one installation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from broker.config import HeraldConfig

log = logging.getLogger("herald.curve")


class ServerKeys:
    """The server's CURVE key pair (Z85), loaded from its secret certificate file."""

    def __init__(self, secret_file: str) -> None:
        public, secret = zmq.auth.load_certificate(secret_file)
        if not secret:
            raise ValueError(f"{secret_file} holds no secret key; name the .key_secret file `herald keys generate` wrote")
        self.public: bytes = public
        self.secret: bytes = secret

    def serve(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server (before it binds)."""
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret

    def connect_as_self(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client with the server's own key pair (the launcher's PING)."""
        sock.curve_serverkey = self.public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


class AllowList:
    """ZAP credentials provider: the public keys of the allowed clients, read once at start."""

    def __init__(self, clients_dir: str | None, server_public: bytes) -> None:
        self.any_client = clients_dir is None
        self.keys: set[bytes] = {server_public}
        if clients_dir is not None:
            self.keys |= set(zmq.auth.load_certificates(clients_dir))

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = self.any_client or key in self.keys
        if not allowed:
            log.warning("refused a CURVE client whose public key is not in curve_clients_dir")
        return allowed


def start_curve(config: HeraldConfig, context: zmq.Context[Any]) -> tuple[ServerKeys, ThreadAuthenticator] | None:
    """Load the server keys and start this process's ZAP handler; None when CURVE is off."""
    if not config.curve_secret_key_file:
        return None
    keys = ServerKeys(config.curve_secret_key_file)
    authenticator = ThreadAuthenticator(context, log=logging.getLogger("herald.zap"))
    authenticator.start()
    authenticator.configure_curve_callback("*", AllowList(config.curve_clients_dir, keys.public))
    return keys, authenticator


def generate_keys(directory: str, name: str) -> tuple[Path, Path]:
    """Write ``name.key`` (public) and ``name.key_secret`` in ``directory``; returns both paths."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)
