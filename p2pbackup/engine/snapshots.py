"""Snapshots: naming them, listing them, browsing their trees, forgetting them.

A **snapshot reference** is a full id in hex, a unique prefix of one, or
``latest``. Forgetting a snapshot only drops it from the index and the root
record; ``prune`` then frees the space its data alone used.

A **snapshot filter** (:class:`SnapshotFilter`) chooses snapshots by tags,
paths and host, with restic's rules: a snapshot matches when it carries
every tag of any one **tag group** (``--tag a,b --tag c``: a and b, or c),
every path asked for, and any one of the hosts asked for.

**Retagging** (:func:`retag`) rewrites snapshots' tags as restic does: each
snapshot whose tags change is stored again as a new snapshot blob with the
new tags (so a new id) that replaces the old one in the index and the root
record; the old blob is left for ``prune``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from collections.abc import Set as AbstractSet

import attrs
import trio

from p2pbackup.core import blobs, formats, packer
from p2pbackup.engine import retention
from p2pbackup.engine.index import Index
from p2pbackup.engine.repository import Repository
from p2pbackup.errors import NotEnoughShardsError, UsageError
from p2pbackup.model import BlobType, NodeKind, Snapshot, Tree, TreeNode


def resolve(index: Index, ref: str) -> tuple[bytes, Snapshot]:
    """The snapshot that ``ref`` names; UsageError if none or several do."""
    snapshots = index.snapshots()
    if not snapshots:
        raise UsageError("there are no snapshots yet")
    if ref == "latest":
        return max(snapshots, key=lambda item: (item[1].time_ns, item[0]))
    wanted = ref.lower()
    matches = [item for item in snapshots if item[0].hex().startswith(wanted)]
    if not matches:
        raise UsageError(f"no snapshot matches {ref!r}")
    if len(matches) > 1:
        ids = ", ".join(m[0].hex()[:12] for m in matches)
        raise UsageError(f"{ref!r} is ambiguous: it matches {ids}")
    return matches[0]


def tag_groups(options: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """restic's ``--tag`` options: each a group of comma-separated tags."""
    groups = []
    for text in options:
        group = retention.tag_group(text)
        if not group:
            raise UsageError(f"--tag {text!r} names no tag")
        groups.append(group)
    return tuple(groups)


def tag_list(options: Sequence[str]) -> tuple[str, ...]:
    """Tags given as options that each may hold several, comma-separated."""
    return tuple(dict.fromkeys(t for text in options for t in retention.tag_group(text)))


@attrs.frozen
class SnapshotFilter:
    """Which snapshots a command looks at (module docstring); empty: all."""

    tags: tuple[tuple[str, ...], ...] = ()
    paths: tuple[bytes, ...] = ()
    hosts: tuple[str, ...] = ()

    @classmethod
    def from_options(
        cls, *, tag: Sequence[str] = (), path: Sequence[str] = (), host: Sequence[str] = ()
    ) -> SnapshotFilter:
        for text in path:
            if not os.path.isabs(text):
                raise UsageError(f"--path {text!r} must be an absolute path")
        return cls(
            tags=tag_groups(tag),
            paths=tuple(os.fsencode(os.path.normpath(p)) for p in path),
            hosts=tuple(host),
        )

    def matches(self, snapshot: Snapshot) -> bool:
        if self.hosts and snapshot.hostname not in self.hosts:
            return False
        if self.paths and not set(self.paths) <= set(snapshot.paths):
            return False
        return not self.tags or any(set(group) <= set(snapshot.tags) for group in self.tags)

    def select(self, rows: Sequence[tuple[bytes, Snapshot]]) -> list[tuple[bytes, Snapshot]]:
        return [row for row in rows if self.matches(row[1])]


async def load_tree(repo: Repository, tree_id: bytes) -> Tree:
    return formats.decode_tree(await repo.load_blob(tree_id, BlobType.TREE))


async def find_node(repo: Repository, snapshot: Snapshot, path: bytes) -> TreeNode | None:
    """The node at ``path`` (absolute, as backed up); None for the root itself."""
    components = [c for c in path.split(b"/") if c]
    tree_id = snapshot.tree
    node: TreeNode | None = None
    for name in components:
        if node is not None:
            if node.kind != NodeKind.DIR or node.subtree is None:
                raise UsageError(f"{os.fsdecode(path)} is not in this snapshot")
            tree_id = node.subtree
        tree = await load_tree(repo, tree_id)
        node = next((n for n in tree.nodes if n.name == name), None)
        if node is None:
            raise UsageError(f"{os.fsdecode(path)} is not in this snapshot")
    return node


async def walk(
    repo: Repository, snapshot: Snapshot, path: bytes = b"/"
) -> AsyncIterator[tuple[bytes, TreeNode]]:
    """Every (absolute path, node) at and below ``path``, depth first, in name order."""
    node = await find_node(repo, snapshot, path)
    prefix = b"/" + b"/".join(c for c in path.split(b"/") if c)
    if node is None:
        async for item in _walk_tree(repo, snapshot.tree, b""):
            yield item
        return
    yield prefix, node
    if node.kind == NodeKind.DIR and node.subtree is not None:
        async for item in _walk_tree(repo, node.subtree, prefix):
            yield item


async def _walk_tree(
    repo: Repository, tree_id: bytes, prefix: bytes
) -> AsyncIterator[tuple[bytes, TreeNode]]:
    tree = await load_tree(repo, tree_id)
    for node in tree.nodes:
        path = prefix + b"/" + node.name
        yield path, node
        if node.kind == NodeKind.DIR and node.subtree is not None:
            async for item in _walk_tree(repo, node.subtree, path):
                yield item


async def live_blobs(
    repo: Repository, without: AbstractSet[bytes] = frozenset()
) -> tuple[set[bytes], list[str]]:
    """Every blob id the live snapshots (less those in ``without``) reach,
    and descriptions of what is unreadable."""
    reached = await reach(repo, without=without)
    return reached.live, reached.problems


@attrs.frozen
class Reached:
    """What the live snapshots reach (:func:`reach`)."""

    #: Every blob id.
    live: set[bytes]
    #: What could not be read, and where.
    problems: list[str]
    #: Snapshot id -> the watched packs it has blobs in.
    packs: dict[bytes, frozenset[bytes]]


async def reach(
    repo: Repository,
    watched: Mapping[bytes, bytes] | None = None,
    *,
    without: AbstractSet[bytes] = frozenset(),
) -> Reached:
    """Walk every live snapshot but those in ``without``: the blobs it
    reaches, what cannot be read, and which of the packs in ``watched``
    (blob id -> pack id) it has blobs in. Each tree is read once, however
    many snapshots share it."""
    watched = watched or {}
    live: set[bytes] = set()
    problems: list[str] = []
    #: Tree id -> the watched packs of the blobs at and below it.
    below: dict[bytes, frozenset[bytes]] = {}

    async def visit(tree_id: bytes, where: str) -> frozenset[bytes]:
        if tree_id in below:
            return below[tree_id]
        below[tree_id] = frozenset()
        live.add(tree_id)
        packs = {watched[tree_id]} if tree_id in watched else set()
        try:
            tree = await load_tree(repo, tree_id)
        except NotEnoughShardsError as exc:
            problems.append(f"{where}: tree cannot be read ({exc})")
            below[tree_id] = frozenset(packs)
            return below[tree_id]
        for node in tree.nodes:
            path = f"{where.rstrip('/')}/{os.fsdecode(node.name)}"
            live.update(node.content)
            if watched:
                packs.update(watched[blob] for blob in node.content if blob in watched)
            if node.subtree is not None:
                packs |= await visit(node.subtree, path)
        below[tree_id] = frozenset(packs)
        return below[tree_id]

    per_snapshot: dict[bytes, frozenset[bytes]] = {}
    for snapshot_id, snapshot in repo.index.snapshots():
        if snapshot_id in without:
            continue
        live.add(snapshot_id)
        packs = await visit(snapshot.tree, f"snapshot {snapshot_id.hex()[:12]} /")
        if snapshot_id in watched:
            packs |= {watched[snapshot_id]}
        per_snapshot[snapshot_id] = packs
    return Reached(live, problems, per_snapshot)


async def forget(repo: Repository, refs: list[str]) -> list[bytes]:
    """Drop the named snapshots; returns their ids."""
    chosen = []
    for ref in refs:
        snapshot_id, _ = resolve(repo.index, ref)
        if snapshot_id not in chosen:
            chosen.append(snapshot_id)
    await forget_ids(repo, chosen)
    return chosen


async def forget_ids(repo: Repository, snapshot_ids: list[bytes]) -> None:
    """Drop the snapshots of ``snapshot_ids`` (none: nothing is written)."""
    if not snapshot_ids:
        return
    await repo.check_writer()  # before the index forgets anything
    with repo.index.transaction():
        for snapshot_id in snapshot_ids:
            repo.index.remove_snapshot(snapshot_id)
    await repo.publish_root()


async def apply_retention(
    repo: Repository,
    policy: retention.RetentionPolicy,
    *,
    tz: datetime.tzinfo,
    group_by: Sequence[str] = retention.DEFAULT_GROUP_BY,
    group_of: bytes | None = None,
    dry_run: bool = False,
) -> retention.RetentionDecision:
    """Forget what ``policy`` does not keep (with ``dry_run``, only decide):
    of every snapshot, or with ``group_of`` only of that snapshot's group."""
    rows = repo.index.snapshots()
    if group_of is not None:
        chosen = dict(rows).get(group_of)
        if chosen is not None:
            key = retention.group_key(chosen, group_by)
            rows = [row for row in rows if retention.group_key(row[1], group_by) == key]
    decision = retention.apply_policy(policy, rows, tz=tz, group_by=group_by)
    if not dry_run:
        await forget_ids(repo, decision.removed)
    return decision


@attrs.frozen
class Retagged:
    """One snapshot :func:`retag` was asked to change."""

    old_id: bytes
    #: The snapshot that replaces it; equal to ``old_id`` when its tags were
    #: already those asked for (nothing was written).
    new_id: bytes
    tags: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return self.new_id != self.old_id


def new_tags(
    tags: Sequence[str],
    *,
    add: Sequence[str] = (),
    remove: Sequence[str] = (),
    replace: Sequence[str] | None = None,
) -> tuple[str, ...]:
    """``tags`` replaced by ``replace`` (when given), then with ``add``
    appended and ``remove`` taken out; each tag once, in order."""
    base = list(replace) if replace is not None else list(tags)
    dropped = set(remove)
    return tuple(t for t in dict.fromkeys([*base, *add]) if t not in dropped)


async def retag(
    repo: Repository,
    refs: Sequence[str],
    *,
    add: Sequence[str] = (),
    remove: Sequence[str] = (),
    replace: Sequence[str] | None = None,
) -> list[Retagged]:
    """Give the snapshots ``refs`` name new tags (module docstring): the new
    snapshot blobs go to the peers in one pack, which an index segment names
    (a recovered home finds them), before the index and the root record swap
    each old snapshot for its new one."""
    chosen = dict(resolve(repo.index, ref) for ref in refs)
    results: list[Retagged] = []
    rewritten: list[tuple[bytes, bytes, Snapshot]] = []
    builders = [packer.PackBuilder(repo.config.pack_size)]
    queued: set[bytes] = set()
    for old_id, snap in chosen.items():
        tags = new_tags(snap.tags, add=add, remove=remove, replace=replace)
        if tags == snap.tags:
            results.append(Retagged(old_id, old_id, tags))
            continue
        new = attrs.evolve(snap, tags=tags)
        data = formats.encode_snapshot(new)
        new_id = blobs.blob_id(repo.keyring.dedup_key, data)
        results.append(Retagged(old_id, new_id, tags))
        rewritten.append((old_id, new_id, new))
        if not repo.index.has_blob(new_id) and new_id not in queued:
            queued.add(new_id)
            sealed = await trio.to_thread.run_sync(
                blobs.seal_blob, repo.keyring.data_key, BlobType.SNAPSHOT, new_id, data
            )
            if not builders[-1].fits(len(sealed)):
                builders.append(packer.PackBuilder(repo.config.pack_size))
            builders[-1].add(BlobType.SNAPSHOT, new_id, sealed, len(data))
    if not rewritten:
        return results
    await repo.check_writer()  # before anything is written
    if queued:
        await repo.probe_peers()
        repo.check_enough_peers()
        for builder in builders:
            await repo.write_pack(builder)
        await repo.write_index_segment(repo.index.packs_without_segment())
    with repo.index.transaction():
        for old_id, new_id, new in rewritten:
            repo.index.add_snapshot(new_id, new)
            if old_id != new_id:
                repo.index.remove_snapshot(old_id)
    await repo.publish_root()
    return results
