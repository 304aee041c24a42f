"""Snapshots: naming them, listing them, browsing their trees, forgetting them.

A **snapshot reference** is a full id in hex, a unique prefix of one, or
``latest``. Forgetting a snapshot only drops it from the index and the root
record; ``prune`` then frees the space its data alone used.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from collections.abc import Set as AbstractSet

import attrs

from p2pbackup.core import formats
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
