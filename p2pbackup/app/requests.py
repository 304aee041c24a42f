"""What a user asks of a home: one typed request per command the service runs.

Nouns:

* **request** — one command on a home's repository and its arguments, as a
  frozen value checked when it is made (:class:`BackupRequest` …
  :class:`FriendRemoveRequest`; :data:`Request` is any of them). The command
  line builds one from what the user typed; ``serve`` decodes one from its
  control socket; :class:`p2pbackup.app.service.Service` runs it either way.
* **command name** — the words a user types for it (``"peer add-dir"``):
  :data:`COMMANDS` maps each to its request class, :func:`command_name` back.
* **client path** — a field naming a file on the side of the user who asked
  (``backup``'s paths, ``restore --target``, ``peer add-dir``'s folder). It is
  always absolute, made so where the user typed it, so that it names the same
  file in a daemon whose working directory is not the user's. Fields marked
  with :data:`CLIENT_PATH` are these.

Serialisation is apart from the classes (:func:`encode_arguments`,
:func:`decode_arguments`): a request's arguments as a JSON object, one member
per field, tuples as arrays. Decoding checks each member against its field's
type, fills a missing one from its default (an older client may not send it)
and ignores members it does not know (a newer client's); the version of this
encoding is the control socket's (:data:`p2pbackup.node.control.CONTROL_VERSION`).
This module is pure: no I/O.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs

from p2pbackup.errors import RemoteProtocolError, UsageError

#: Field metadata of a client path (see the module docstring).
CLIENT_PATH: Final[Mapping[str, bool]] = {"client_path": True}


def is_client_path(field: attrs.Attribute[Any]) -> bool:
    return bool(field.metadata.get("client_path"))


def _absolute(_request: object, field: attrs.Attribute[Any], value: object) -> None:
    values = value if isinstance(value, tuple) else (value,)
    for path in values:
        if isinstance(path, str) and not os.path.isabs(path):
            raise UsageError(f"{field.name}: {path!r} is not an absolute path")


def _not_empty(_request: object, field: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if not value:
        raise UsageError(f"{field.name}: at least one is needed")


def _client_path(*, at_least_one: bool = False) -> Any:
    """A client path field (a tuple of them with ``at_least_one``)."""
    validators = [_not_empty, _absolute] if at_least_one else [_absolute]
    return attrs.field(validator=validators, metadata=CLIENT_PATH)


def _at_least_one(_request: object, field: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise UsageError(f"--{field.name} must be at least 1")


def _limit() -> Any:
    """A bandwidth limit in KiB/s (``--limit-upload``), None for none."""
    return attrs.field(default=None, validator=attrs.validators.optional(_at_least_one_kib))


def _at_least_one_kib(_request: object, field: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise UsageError(f"--{field.name.replace('_', '-')} must be at least 1 (KiB/s)")


# -- the requests -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class BackupRequest:
    #: What to back up; with ``files_from``, besides the paths those list.
    paths: tuple[str, ...] = _client_path()
    exclude: tuple[str, ...] = ()
    #: Files of exclude patterns, a line each (:func:`p2pbackup.core.exclude.list_lines`).
    exclude_file: tuple[str, ...] = attrs.field(
        default=(), validator=_absolute, metadata=CLIENT_PATH
    )
    #: Leave out directories that hold a file of one of these names.
    exclude_if_present: tuple[str, ...] = ()
    #: Leave out what is on another file system than the directory holding it.
    one_file_system: bool = False
    #: Files that list absolute paths to back up, a line each.
    files_from: tuple[str, ...] = attrs.field(default=(), validator=_absolute, metadata=CLIENT_PATH)
    tags: tuple[str, ...] = ()
    #: Write the root record even though another home of this identity
    #: wrote one since this home last did (:mod:`p2pbackup.engine.rootrecord`).
    takeover: bool = False
    #: Say what would be stored, and store nothing (:mod:`p2pbackup.engine.backup`).
    dry_run: bool = False
    #: Make no snapshot when nothing changed since the last one of these paths.
    skip_if_unchanged: bool = False
    #: No progress and no summary: the snapshot id alone (``--quiet``).
    quiet: bool = False
    #: A line for each file read, new or changed (``--verbose``).
    verbose: bool = False
    #: KiB/s at most up and down (None: no limit).
    limit_upload: int | None = _limit()
    limit_download: int | None = _limit()
    json: bool = False

    def __attrs_post_init__(self) -> None:
        if not self.paths and not self.files_from:
            raise UsageError("backup needs the paths to back up, or --files-from FILE")


@attrs.frozen(kw_only=True)
class RestoreRequest:
    snapshot: str
    target: str = _client_path()
    #: Restore only this path of the snapshot (a path inside it, not a client path).
    path: str | None = None
    overwrite: bool = False
    #: Patterns, as ``backup --exclude`` takes them, on the paths as backed up.
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    #: Read every file restored back and compare it with the snapshot.
    verify: bool = False
    limit_upload: int | None = _limit()
    limit_download: int | None = _limit()
    json: bool = False


@attrs.frozen(kw_only=True)
class SnapshotsRequest:
    #: Filters with restic's rules (:class:`p2pbackup.engine.snapshots.SnapshotFilter`):
    #: any ``tag`` option (each ``a,b`` needs all its tags), every ``path``, any ``host``.
    tag: tuple[str, ...] = ()
    path: tuple[str, ...] = attrs.field(default=(), validator=_absolute, metadata=CLIENT_PATH)
    host: tuple[str, ...] = ()
    json: bool = False


@attrs.frozen(kw_only=True)
class StatsRequest:
    #: Snapshot references; none: every snapshot the filters keep.
    snapshots: tuple[str, ...] = ()
    #: ``restore-size`` or ``raw-data`` (:mod:`p2pbackup.engine.stats`).
    mode: str = "restore-size"
    #: Also which peers hold the snapshots' packs, and how much of them.
    by_peer: bool = False
    tag: tuple[str, ...] = ()
    path: tuple[str, ...] = attrs.field(default=(), validator=_absolute, metadata=CLIENT_PATH)
    host: tuple[str, ...] = ()
    json: bool = False


@attrs.frozen(kw_only=True)
class TagRequest:
    """Rewrite snapshots' tags: ``set`` replaces them (``()``: none), then
    ``add`` and ``remove`` (each option may name several, comma-separated)."""

    snapshots: tuple[str, ...] = attrs.field(validator=_not_empty)
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    set: tuple[str, ...] | None = None
    json: bool = False

    def __attrs_post_init__(self) -> None:
        if self.set is None and not self.add and not self.remove:
            raise UsageError("tag needs --add, --remove or --set")
        if self.set is not None and (self.add or self.remove):
            raise UsageError("tag takes --set, or --add and --remove, not both")


@attrs.frozen(kw_only=True)
class LsRequest:
    snapshot: str
    #: A path inside the snapshot; None: all of it.
    path: str | None = None
    json: bool = False


def _not_negative(_request: object, field: attrs.Attribute[Any], value: int) -> None:
    if value < 0:
        raise UsageError(f"--{field.name.replace('_', '-')} must not be negative")


def _keep() -> Any:
    return attrs.field(default=0, validator=_not_negative)


@attrs.frozen(kw_only=True)
class DiffRequest:
    #: The older and the newer snapshot (references, as ``ls`` takes them).
    snapshot1: str
    snapshot2: str
    json: bool = False


@attrs.frozen(kw_only=True)
class FindRequest:
    #: Glob patterns: on the name (no slash) or the whole path (with one).
    patterns: tuple[str, ...] = attrs.field(validator=_not_empty)
    #: Look only in these snapshots; empty: in every one.
    snapshot: tuple[str, ...] = ()
    json: bool = False


@attrs.frozen(kw_only=True)
class DumpRequest:
    """A file's bytes, or a directory as tar, to the client's standard
    output: bytes, so it runs in the client's process (:data:`LOCAL_COMMANDS`)."""

    snapshot: str
    #: A path inside the snapshot.
    path: str


@attrs.frozen(kw_only=True)
class ForgetRequest:
    """Forget the named snapshots, or those a retention policy does not keep
    (:mod:`p2pbackup.engine.retention`): one or the other."""

    snapshots: tuple[str, ...] = ()
    keep_last: int = _keep()
    keep_hourly: int = _keep()
    keep_daily: int = _keep()
    keep_weekly: int = _keep()
    keep_monthly: int = _keep()
    keep_yearly: int = _keep()
    #: restic's form: ``7d``, ``1y6m``.
    keep_within: str | None = None
    keep_tag: tuple[str, ...] = ()
    #: ``host,paths,tags``, any of them; None: the default grouping.
    group_by: str | None = None
    #: Prune afterwards.
    prune: bool = False
    #: Say what would be forgotten (and pruned), and write nothing.
    dry_run: bool = False
    json: bool = False

    def __attrs_post_init__(self) -> None:
        if self.snapshots and self.has_policy:
            raise UsageError("forget takes snapshots or --keep-… options, not both")
        if not self.snapshots and not self.has_policy:
            raise UsageError(
                "forget needs the snapshots to forget, or a policy of what to keep "
                "(--keep-last N, --keep-daily N, --keep-within 30d …)"
            )

    @property
    def has_policy(self) -> bool:
        counts = (self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly,
                  self.keep_monthly, self.keep_yearly)  # fmt: skip
        return any(counts) or self.keep_within is not None or bool(self.keep_tag)


@attrs.frozen(kw_only=True)
class PruneRequest:
    #: Say what would be deleted and repacked, and write nothing.
    dry_run: bool = False
    json: bool = False


@attrs.frozen(kw_only=True)
class CheckRequest:
    read_data: bool = False
    limit_upload: int | None = _limit()
    limit_download: int | None = _limit()
    json: bool = False


@attrs.frozen(kw_only=True)
class StatusRequest:
    json: bool = False


@attrs.frozen(kw_only=True)
class RepairRequest:
    #: How long an unreachable peer counts as asleep, not lost (``"3d"``,
    #: ``"0"``); None: the repair policy's default.
    grace: str | None = None
    #: Bytes a second (``"2M"``) or ``"unlimited"``; None: the default.
    rate: str | None = None
    json: bool = False
    #: Repair another owner's packs, as its delegate (its node id in hex);
    #: None: this home's own.
    owner: str | None = None


@attrs.frozen(kw_only=True)
class LeaveRequest:
    json: bool = False


@attrs.frozen(kw_only=True)
class PeerAddDirRequest:
    path: str = _client_path()


@attrs.frozen(kw_only=True)
class PeerAddRequest:
    #: ``HOST:PORT``.
    address: str
    node_id: str


@attrs.frozen(kw_only=True)
class PeerRemoveRequest:
    #: A peer id, or a unique prefix of it.
    id: str
    force: bool = False


@attrs.frozen(kw_only=True)
class PeerRenameRequest:
    #: A peer's name, id, or a unique prefix of its id.
    id: str
    #: Its new name ("": none).
    name: str


@attrs.frozen(kw_only=True)
class PeerListRequest:
    json: bool = False


@attrs.frozen(kw_only=True)
class PeerFindRequest:
    count: int = attrs.field(default=8, validator=_at_least_one)
    add: bool = False
    #: DHT nodes to join through (``HOST:PORT``), besides friends.
    bootstrap: tuple[str, ...] = ()
    json: bool = False


@attrs.frozen(kw_only=True)
class FriendAddRequest:
    code: str
    #: What to call the friend in lists and commands (``--name alice``).
    name: str | None = None


@attrs.frozen(kw_only=True)
class FriendListRequest:
    json: bool = False


@attrs.frozen(kw_only=True)
class FriendRemoveRequest:
    #: A node id, or a unique prefix of it.
    id: str
    force: bool = False


@attrs.frozen(kw_only=True)
class DelegateAddRequest:
    #: A node id, or a unique prefix of it, of a node peer.
    id: str


@attrs.frozen(kw_only=True)
class DelegateListRequest:
    json: bool = False


@attrs.frozen(kw_only=True)
class DelegateRemoveRequest:
    #: A node id, or a unique prefix of it.
    id: str


Request = (
    PeerRenameRequest
    | BackupRequest
    | RestoreRequest
    | SnapshotsRequest
    | TagRequest
    | StatsRequest
    | LsRequest
    | DiffRequest
    | FindRequest
    | DumpRequest
    | ForgetRequest
    | PruneRequest
    | CheckRequest
    | StatusRequest
    | RepairRequest
    | LeaveRequest
    | PeerAddDirRequest
    | PeerAddRequest
    | PeerRemoveRequest
    | PeerListRequest
    | PeerFindRequest
    | FriendAddRequest
    | FriendListRequest
    | FriendRemoveRequest
    | DelegateAddRequest
    | DelegateListRequest
    | DelegateRemoveRequest
)

#: Each command the service runs, by the name a user types for it.
COMMANDS: Final[Mapping[str, type[Request]]] = {
    "backup": BackupRequest,
    "restore": RestoreRequest,
    "snapshots": SnapshotsRequest,
    "tag": TagRequest,
    "stats": StatsRequest,
    "ls": LsRequest,
    "diff": DiffRequest,
    "find": FindRequest,
    "dump": DumpRequest,
    "forget": ForgetRequest,
    "prune": PruneRequest,
    "check": CheckRequest,
    "status": StatusRequest,
    "repair": RepairRequest,
    "leave": LeaveRequest,
    "peer add-dir": PeerAddDirRequest,
    "peer add": PeerAddRequest,
    "peer remove": PeerRemoveRequest,
    "peer list": PeerListRequest,
    "peer rename": PeerRenameRequest,
    "peer find": PeerFindRequest,
    "friend add": FriendAddRequest,
    "friend list": FriendListRequest,
    "friend remove": FriendRemoveRequest,
    "delegate add": DelegateAddRequest,
    "delegate list": DelegateListRequest,
    "delegate remove": DelegateRemoveRequest,
}

#: Commands that write bytes, not lines, to the client's standard output:
#: they run in the client's own process, never through the daemon.
LOCAL_COMMANDS: Final = frozenset({"dump"})

_NAMES: Final[Mapping[type[Request], str]] = {cls: name for name, cls in COMMANDS.items()}

for _cls in COMMANDS.values():
    # Field types as objects, not the strings postponed annotations leave.
    attrs.resolve_types(_cls)


def command_name(request: Request) -> str:
    return _NAMES[type(request)]


# -- serialisation ------------------------------------------------------------------------


def encode_arguments(request: Request) -> dict[str, Any]:
    """A request's fields as a JSON object (tuples as lists)."""
    return {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in attrs.asdict(request).items()
    }


def decode_arguments(cls: type[Request], arguments: Mapping[str, Any]) -> Request:
    """The request of class ``cls`` that ``arguments`` encode.

    :class:`RemoteProtocolError` for a member of the wrong type or a missing
    one without a default; :class:`UsageError` for a value its field refuses
    (a relative client path, a count of 0).
    """
    values: dict[str, Any] = {}
    for field in attrs.fields(cls):
        if field.name not in arguments:
            if field.default is attrs.NOTHING:
                raise RemoteProtocolError(
                    f"control request: `{_NAMES[cls]}` needs the argument {field.name}"
                )
            continue
        values[field.name] = _decode_value(cls, field, arguments[field.name])
    return cls(**values)


def _decode_value(cls: type[Request], field: attrs.Attribute[Any], value: object) -> object:
    described, fits = _FIELD_TYPES[field.type]
    if not fits(value):
        raise RemoteProtocolError(
            f"control request: `{_NAMES[cls]}`'s {field.name} must be {described}"
        )
    return tuple(value) if isinstance(value, list) else value


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


#: Each type a request's field may have: how to name it, what JSON value fits it.
_FIELD_TYPES: Final[Mapping[object, tuple[str, Callable[[object], bool]]]] = {
    bool: ("true or false", lambda value: isinstance(value, bool)),
    int: ("an integer", lambda value: isinstance(value, int) and not isinstance(value, bool)),
    int | None: (
        "an integer or null",
        lambda value: value is None or (isinstance(value, int) and not isinstance(value, bool)),
    ),
    str: ("a string", lambda value: isinstance(value, str)),
    str | None: ("a string or null", lambda value: value is None or isinstance(value, str)),
    tuple[str, ...]: ("a list of strings", _strings),
    tuple[str, ...] | None: (
        "a list of strings or null",
        lambda value: value is None or _strings(value),
    ),
}
