"""The owner-side data model: frozen values, no I/O, no serialisation.

Nouns:

* **blob** — one encrypted object inside a pack: a file's *data chunk*, a
  directory *tree*, a *snapshot*, or an *index* segment. A blob id is a keyed
  BLAKE2b-256 of the blob's plaintext under the user's dedup key, so equal
  plaintexts are stored once and no outsider can confirm a guessed file.
* **pack** — encrypted blobs concatenated, followed by an encrypted
  :class:`PackHeader` and padding; the unit of erasure coding. A pack id is
  32 random bytes chosen when the pack is made.
* **shard** — one of the n pieces a pack is erasure-coded into, each stored on
  a different peer under a :class:`ShardLocation`.
* **tree** — one directory's listing (:class:`Tree` of :class:`TreeNode`).
* **snapshot** — a backup run: the root tree and what was asked for.
* **index segment** — pack records written by one backup or prune, stored as
  an ``INDEX`` blob so that a new home can rebuild its SQLite index.
* **friend** — a node added with an invite code (:class:`FriendRecord`); it is
  also a peer (kind "node") that shards may be placed on.
* **delegation certificate**, **repair grant** — what an owner gives a
  friend it chooses as its **delegate**, so that the friend can keep its
  backups alive while it is away (docs/delegation.md): the right to audit,
  renew and put rebuilt shards in the owner's namespace
  (:class:`DelegationCertificate`), and the shard maps repair needs
  (:class:`RepairGrant`).
* **root record** — the small, signed and encrypted entry point stored on every
  peer: configuration, peers, index packs and live snapshots.
* **peer audits** — what audits have said of a peer (:class:`PeerAudits`):
  its passed and failed audits, each count decaying as newer audits come
  (the policy is :mod:`p2pbackup.maintenance.reputation`'s), and whether it
  was **disqualified**; its **score** is the decayed share of audits passed.
* **shard audit** — what the last audit said of one shard on its peer, and
  when the next is due (:class:`ShardAudit`).
* **file stat** — what a backup keeps of a file's ``stat`` after reading it
  (:class:`FileStat`), and a **read outcome** — a file's content (chunk ids)
  and file stat, or why it was left out (:class:`ReadOutcome`).

Serialisation of every class here lives in :mod:`p2pbackup.core.formats`.
"""

from __future__ import annotations

import enum
from typing import TypeAlias

import attrs

#: Size in bytes of blob ids, pack ids, snapshot ids and Merkle roots.
ID_SIZE = 32
#: Size in bytes of a node id (BLAKE2b-160 of the Ed25519 public key).
NODE_ID_SIZE = 20
#: Size in bytes of a home's instance id (:class:`RootRecord`).
INSTANCE_ID_SIZE = 16
#: Most shards a pack is coded into: a GF(2^8) Reed-Solomon codeword has at
#: most 255 symbols.
MAX_SHARDS = 255

#: Anything whose bytes can be read without copying: bytes or a buffer over them.
BytesLike: TypeAlias = bytes | bytearray | memoryview


class BlobType(enum.IntEnum):
    DATA = 0
    TREE = 1
    SNAPSHOT = 2
    INDEX = 3


class NodeKind(enum.IntEnum):
    FILE = 0
    DIR = 1
    SYMLINK = 2
    #: Named pipe; kept as a name and metadata (no content).
    FIFO = 3
    #: Character and block devices, with their device number (``rdev``).
    CHARDEV = 4
    BLOCKDEV = 5


@attrs.frozen
class BlobEntry:
    """Where one sealed blob sits inside its pack."""

    type: BlobType
    blob_id: bytes
    offset: int
    #: Length of the sealed (encrypted) blob inside the pack.
    length: int
    #: Length of the blob's plaintext (so a restorer can place chunks in a
    #: file before decrypting them).
    raw_length: int


@attrs.frozen
class PackHeader:
    """The encrypted table of contents at the end of a pack."""

    entries: tuple[BlobEntry, ...]


@attrs.frozen
class TreeNode:
    """One entry of a directory listing.

    ``name`` is bytes so that names that are not valid UTF-8 survive.
    ``content`` lists the data-chunk ids of a file in order; ``subtree`` is the
    tree id of a directory; ``link_target`` is a symlink's target.
    ``hardlink_group`` is non-zero for files that were hard links of one
    another within the snapshot (same group number, same content).
    ``rdev`` is a device's number (zero for everything else). ``xattrs`` are
    the entry's extended attributes as (name, value) pairs sorted by name;
    POSIX ACLs are among them (``system.posix_acl_access`` and, on a
    directory, ``system.posix_acl_default``).
    """

    name: bytes
    kind: NodeKind
    mode: int
    mtime_ns: int
    size: int = 0
    content: tuple[bytes, ...] = ()
    subtree: bytes | None = None
    link_target: bytes | None = None
    uid: int = 0
    gid: int = 0
    hardlink_group: int = 0
    rdev: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()


@attrs.frozen
class Tree:
    """A directory listing; nodes sorted by name, names unique."""

    nodes: tuple[TreeNode, ...]


@attrs.frozen
class Snapshot:
    """One backup run."""

    time_ns: int
    hostname: str
    paths: tuple[bytes, ...]
    tags: tuple[str, ...]
    tree: bytes
    #: Files and bytes the snapshot covers (for listings without walking trees).
    file_count: int = 0
    total_size: int = 0


@attrs.frozen
class ShardLocation:
    """Shard ``index`` of a pack lives on ``peer_id``; ``merkle_root`` is the root
    of the whole stored shard (header and data) over the pack's block size."""

    index: int
    peer_id: str
    merkle_root: bytes


@attrs.frozen
class PackRecord:
    """Everything needed to fetch, verify and decode one pack."""

    pack_id: bytes
    #: Length of the padded pack in bytes (what erasure.decode needs as size).
    size: int
    k: int
    n: int
    #: Length of each shard's data (without the shard header).
    shard_size: int
    #: Merkle block size of every shard of this pack.
    block_size: int
    shards: tuple[ShardLocation, ...]
    blobs: tuple[BlobEntry, ...]


@attrs.frozen
class DelegationCertificate:
    """The owner's word that node ``delegate`` may keep its shards alive.

    Storage nodes honour it, from a session of the delegate, for audits,
    lease renewals and puts of rebuilt shards in the owner's namespace, from
    ``issued_at`` until ``expiry`` (unix seconds, ``expiry`` excluded). The
    owner's public key travels with it, so that a node that never met the
    owner can check the signature; the owner's node id is that key's hash.
    """

    owner: bytes = attrs.field(repr=bytes.hex)
    owner_public_key: bytes = attrs.field(repr=bytes.hex)
    delegate: bytes = attrs.field(repr=bytes.hex)
    issued_at: int
    expiry: int


@attrs.frozen
class GrantPeer:
    """A node holding shards named in a repair grant, and where it was last
    known to listen (``HOST:PORT`` texts; hints, not authority)."""

    node_id: bytes = attrs.field(repr=bytes.hex)
    addresses: tuple[str, ...]


@attrs.frozen
class GrantShard:
    """Shard ``index`` of a pack, held by the grant's peer number ``peer``
    (a position in :attr:`RepairGrant.peers`), with its Merkle root."""

    index: int
    peer: int
    merkle_root: bytes = attrs.field(repr=bytes.hex)


@attrs.frozen
class GrantPack:
    """What repairing one pack needs, and nothing about what is in it.

    Its shard ids are derived (``core.formats.shard_id(pack_id, index)``),
    so they are not carried here.
    """

    pack_id: bytes = attrs.field(repr=bytes.hex)
    #: The padded pack's length, which decoding needs: one of a few size
    #: buckets, within k bytes of k shard sizes, and in every shard's header.
    size: int
    k: int
    n: int
    #: Bytes of each shard's data (without its header), and its Merkle block size.
    shard_size: int
    block_size: int
    shards: tuple[GrantShard, ...]


@attrs.frozen
class RepairGrant:
    """An owner's shard maps, handed to a delegate: every pack's code, shard
    roots and holders. No key, name, snapshot or index; a higher
    ``sequence`` replaces a lower one."""

    owner: bytes = attrs.field(repr=bytes.hex)
    sequence: int
    issued_at: int
    peers: tuple[GrantPeer, ...]
    packs: tuple[GrantPack, ...]
    #: Every delegate the owner has (node ids, ascending): their order is
    #: the order in which they step in while the owner is away.
    delegates: tuple[bytes, ...] = ()


@attrs.frozen
class LogEntry:
    """Shard ``index`` of pack ``pack_id`` is on node ``holder`` now, put
    there by a delegate; ``merkle_root`` is its root (the owner's own, since
    a rebuilt shard is the same bytes)."""

    pack_id: bytes = attrs.field(repr=bytes.hex)
    index: int
    holder: bytes = attrs.field(repr=bytes.hex)
    merkle_root: bytes = attrs.field(repr=bytes.hex)


@attrs.frozen
class RepairLog:
    """What a delegate changed for an owner since the owner's grant of
    ``grant_sequence``: where the shards it rebuilt are now. Signed by the
    delegate, read back by the owner when it returns."""

    delegate: bytes = attrs.field(repr=bytes.hex)
    owner: bytes = attrs.field(repr=bytes.hex)
    grant_sequence: int
    made_at: int
    entries: tuple[LogEntry, ...]
    #: When the delegate last ran a pass for the owner (0: never, or a log
    #: of version 1, which did not say).
    acted_at: int = 0


@attrs.frozen
class IndexSegment:
    """Pack records written by one backup or prune."""

    packs: tuple[PackRecord, ...]


#: Kind of a peer that is a local folder; its location is the folder's path.
PEER_KIND_DIR = "dir"
#: Kind of a peer that is a storage node on the network; its peer id is the
#: node id in hex and its location the last known ``host:port``.
PEER_KIND_NODE = "node"


@attrs.frozen
class PeerRecord:
    """A peer as the owner knows it: a stable id, a kind and where to reach it."""

    peer_id: str
    #: :data:`PEER_KIND_DIR` or :data:`PEER_KIND_NODE`.
    kind: str
    location: str


@attrs.frozen
class FriendRecord:
    """A node added with its invite code (:mod:`p2pbackup.dht.invites`).

    ``public_key`` is the Ed25519 identity key the invite carried: every
    session to the friend must prove it. ``addresses`` are where it was last
    known to listen, as ``HOST:PORT`` texts; hints, not authority.
    ``added_at`` is unix seconds.
    """

    node_id: bytes = attrs.field(repr=bytes.hex)
    public_key: bytes = attrs.field(repr=bytes.hex)
    addresses: tuple[str, ...]
    added_at: int


@attrs.frozen
class RepositoryConfig:
    """Parameters fixed at ``init`` (k/n may be changed later for new packs)."""

    k: int
    n: int
    pack_size: int
    chunk_min: int
    chunk_avg: int
    chunk_max: int
    block_size: int


@attrs.frozen
class RootRecord:
    """The entry point a new home needs, replicated to every peer."""

    sequence: int
    time_ns: int
    config: RepositoryConfig
    peers: tuple[PeerRecord, ...]
    index_packs: tuple[PackRecord, ...]
    snapshots: tuple[bytes, ...]
    #: The friend list with their keys and last addresses, so that a home
    #: recovered on a new machine knows its friends again.
    friends: tuple[FriendRecord, ...] = ()
    #: The instance id of the home that wrote the record: random, made when
    #: the home was (``init``, ``recover``), so that two homes of one
    #: identity notice each other (:mod:`p2pbackup.engine.rootrecord`).
    #: Empty in records written before homes had one.
    instance: bytes = b""
    #: The home's ``config.toml`` as it was (UTF-8 text; empty: none), so
    #: that ``recover`` brings back its schedules, paths and offer.
    settings: bytes = b""
    #: The names the user gave peers and friends: (peer id, name), by id.
    names: tuple[tuple[str, str], ...] = ()
    #: The node ids of the home's delegates, by id, so that a home recovered
    #: from its key reads their repair logs and hands them grants again.
    delegates: tuple[bytes, ...] = ()


@attrs.frozen
class ShardHeader:
    """The versioned header in front of every stored shard's data.

    Peers see it: the code parameters and the shard's place in them, and the
    padded pack's size (one of a few buckets), never anything about the files
    inside nor which pack it belongs to. The shard's Merkle root covers this
    header and the data after it, so it cannot live in here: the owner keeps
    it (:class:`ShardLocation`) and declares it to the host.
    """

    #: The pack, in headers written before shard headers stopped naming it
    #: (format version 1); None since.
    pack_id: bytes | None
    index: int
    k: int
    n: int
    #: Length of the padded pack (what erasure.decode needs as ``size``).
    pack_size: int
    #: Length of the shard data that follows the header.
    shard_size: int
    block_size: int


@attrs.frozen
class SealingKeys:
    """The keys a file's chunks are identified and sealed with."""

    dedup_key: bytes = attrs.field(repr=False)
    data_key: bytes = attrs.field(repr=False)


@attrs.frozen
class FileStat:
    """What a backup keeps of a file's ``stat``; named as in ``os.stat_result``."""

    st_mode: int
    st_size: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_ino: int
    st_uid: int
    st_gid: int


@attrs.frozen
class ReadOutcome:
    """A file read whole (``content`` and ``stat``), or left out (``error``)."""

    content: tuple[bytes, ...] = ()
    stat: FileStat | None = None
    error: str | None = None


@attrs.frozen
class PeerAudits:
    """What audits have said of one peer (module docstring: peer audits)."""

    #: Audits passed and failed, each decayed by every audit counted since.
    passed: float
    failed: float
    #: Audits counted in all, and those failed (not decayed).
    audits: int = 0
    failures: int = 0
    #: Unix seconds of the last audit counted; None if none was.
    last_audit: int | None = None
    #: What the last failed audit found ("" if none failed).
    last_failure: str = ""
    #: Unix seconds at which the peer was disqualified; None while it is not.
    disqualified_at: int | None = None

    @property
    def score(self) -> float:
        """The decayed share of audits passed, 0 to 1 (1 before any audit)."""
        total = self.passed + self.failed
        return 1.0 if total <= 0 else self.passed / total

    @property
    def disqualified(self) -> bool:
        return self.disqualified_at is not None


@attrs.frozen
class ShardAudit:
    """What the last audit said of one shard on ``peer_id``, and when the
    next is due (module docstring: shard audit)."""

    peer_id: str
    #: Unix seconds at which the next audit is due.
    due_at: int
    #: Unix seconds of the last audit answered, passed or failed; None: never.
    audited_at: int | None = None
    #: Whether that audit passed; None if the shard was never audited.
    passed: bool | None = None
    #: What a failed audit found ("" otherwise).
    reason: str = ""
