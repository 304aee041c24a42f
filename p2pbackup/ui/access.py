"""Who may use the dashboard, and where it is: the token and the address file.

Nouns:

* **token** — ``HOME/ui-token`` (mode 0600, ``"p2pbackup-ui-token 1"`` then
  the token on a line): a random secret made on first use. Whoever shows it
  may use the dashboard; ``p2pbackup ui`` prints it inside the URL.
* **dashboard address** — ``HOME/ui-address`` (``"p2pbackup-ui-address 1"``
  then ``http://HOST:PORT``): where the running ``serve``'s dashboard listens,
  written once it does, so that ``p2pbackup ui`` finds a port chosen at start.
* **dashboard URL** — the address with the token as ``?token=``: opening it
  once sets a cookie, and the token leaves the address bar.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path
from typing import Final

from p2pbackup.errors import UsageError
from p2pbackup.stores.durable import write_private_file

TOKEN_FILE: Final = "ui-token"
ADDRESS_FILE: Final = "ui-address"
_TOKEN_MAGIC: Final = "p2pbackup-ui-token 1"
_ADDRESS_MAGIC: Final = "p2pbackup-ui-address 1"
#: Port the dashboard listens on unless told otherwise (the node's is 47470).
DEFAULT_UI_PORT: Final = 47471


def token_path(home: Path) -> Path:
    return home / TOKEN_FILE


def address_path(home: Path) -> Path:
    return home / ADDRESS_FILE


def load_token(home: Path) -> str:
    """The home's dashboard token, made (0600) if there is none yet."""
    path = token_path(home)
    try:
        text = path.read_text()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        write_private_file(path, f"{_TOKEN_MAGIC}\n{token}\n".encode())
        return token
    lines = text.splitlines()
    if len(lines) != 2 or lines[0] != _TOKEN_MAGIC or len(lines[1]) < 32:
        raise UsageError(f"{path} is not a dashboard token; remove it to make a new one")
    return lines[1]


def token_matches(expected: str, given: str | None) -> bool:
    """Whether ``given`` is the token (in constant time)."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def write_address(home: Path, url: str) -> None:
    write_private_file(address_path(home), f"{_ADDRESS_MAGIC}\n{url}\n".encode())


def read_address(home: Path) -> str | None:
    """Where the home's dashboard last listened; None if it never did."""
    try:
        lines = address_path(home).read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    if len(lines) != 2 or lines[0] != _ADDRESS_MAGIC or not lines[1].startswith("http://"):
        return None
    return lines[1]


def dashboard_url(address: str, token: str) -> str:
    return f"{address.rstrip('/')}/?token={token}"


def http_address(host: str, port: int) -> str:
    """``http://HOST:PORT`` (an IPv6 host in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
