"""``p2pbackup demo``: the whole story in one command.

The default story runs on a local network (:mod:`p2pbackup.app.devnet`): six
homes, each served by its own ``p2pbackup serve`` process on 127.0.0.1, all
friends of each other. Home 1 backs up a generated sample tree to its five
friends (the code adapts to the peers there are), two friends' nodes are
SIGKILLed, home 1's machine is lost with its home directory, and a fresh home
recovers from home 1's recovery key and one surviving friend's invite code,
restores, and proves every byte, mode, mtime and link equal.

``demo --folders`` is the older story on folder peers: six of them with
3-of-6 shards, three destroyed in different ways (deleted, every shard
corrupted, emptied), a restore; then the home deleted, recovered from the key
and one surviving folder, and restored again.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from p2pbackup.app import operations
from p2pbackup.app.devnet import open_devnet
from p2pbackup.app.home import Home
from p2pbackup.engine.backup import Backup
from p2pbackup.engine.progress import Progress
from p2pbackup.engine.restore import Restorer
from p2pbackup.engine.treediff import diff_trees
from p2pbackup.stores.durable import write_private_file

_PEERS = 6
#: The network story: six homes; node-01 backs up; node-03 and node-05 die;
#: node-02's invite code leads the recovery.
_NODES = 6
_KILLED = (2, 4)
_SURVIVOR = 1


def _step(number: int, text: str) -> None:
    print(f"\n[{number}] {text}", flush=True)


def _say(text: str) -> None:
    print(f"    {text}", flush=True)


def make_sample_tree(root: Path, *, seed: int = 7, scale_mb: int = 24) -> None:
    """A small, varied tree: text, binary, a large file, duplicates, odd names."""
    rng = random.Random(seed)
    words = [f"w{rng.randrange(10_000)}" for _ in range(2000)]
    (root / "Documents" / "notes").mkdir(parents=True)
    (root / "Pictures").mkdir()
    (root / "src" / "project" / "pkg").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    for i in range(40):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(50, 3000)))
        (root / "Documents" / "notes" / f"note-{i:02}.txt").write_text(text)
    for i in range(25):
        code = "\n".join(f"def f{j}(x):\n    return x * {j}" for j in range(rng.randrange(5, 300)))
        (root / "src" / "project" / "pkg" / f"mod{i}.py").write_text(code)
    for i in range(6):
        (root / "Pictures" / f"IMG_{i:04}.jpg").write_bytes(
            rng.randbytes(rng.randrange(200_000, 900_000))
        )
    (root / "Pictures" / "holiday.mov").write_bytes(rng.randbytes(scale_mb * 1024 * 1024 // 2))
    # The same photo in two folders: stored once.
    shutil.copy2(root / "Pictures" / "IMG_0001.jpg", root / "Documents" / "IMG_0001-copy.jpg")
    (root / "Documents" / "empty.txt").write_bytes(b"")
    os.link(root / "Documents" / "notes" / "note-00.txt", root / "Documents" / "hardlink.txt")
    (root / "Documents" / "latest-note").symlink_to("notes/note-39.txt")
    # A name that is not valid UTF-8 (Latin-1 "café").
    with open(os.path.join(os.fsencode(root / "Documents"), b"caf\xe9.txt"), "wb") as f:
        f.write(b"bytes in a name that is not UTF-8\n")
    script = root / "src" / "project" / "run.sh"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o755)
    past = time.time() - 86400 * 30
    os.utime(root / "Documents" / "notes" / "note-05.txt", (past, past))


def _corrupt_shards(peer: Path) -> int:
    count = 0
    for path in sorted(peer.rglob("*")):
        if path.is_file() and path.parent.parent.name == "shards":
            data = bytearray(path.read_bytes())
            for i in range(200, len(data), 4099):
                data[i] ^= 0xFF
            path.write_bytes(bytes(data))
            count += 1
    return count


def _empty_peer(peer: Path) -> int:
    count = 0
    for path in sorted(peer.rglob("*")):
        if path.is_file() and path.parent.parent.name == "shards":
            path.unlink()
            count += 1
    return count


async def _restore_and_compare(home: Home, sample: Path, target: Path) -> bool:
    async with operations.open_repository(home) as repo:
        snapshots = repo.index.snapshots()
        _sid, snapshot = max(snapshots, key=lambda s: s[1].time_ns)
        summary = await Restorer(repo, target, progress=Progress("restore")).run(snapshot)
    for line in summary.lines():
        _say(line)
    restored = target / str(sample).lstrip("/")
    problems = diff_trees(sample, restored)
    if problems or not summary.ok:
        for problem in problems[:20]:
            _say(f"DIFFERENCE: {problem}")
        return False
    _say(f"compared {restored} with {sample}: every byte, mode, mtime and link is equal")
    return True


async def run_demo(workdir: Path | None, *, keep: bool = False, folders: bool = False) -> int:
    """Run the demo in ``workdir`` (default: a new temporary directory,
    removed afterwards unless ``keep`` or the demo failed). Exit status."""
    created = workdir is None
    base = Path(tempfile.mkdtemp(prefix="p2pbackup-demo-")) if workdir is None else workdir
    base = base.absolute()
    base.mkdir(parents=True, exist_ok=True)
    failed = False
    try:
        status = await (_run_folders(base) if folders else _run_network(base))
        failed = status != 0
        return status
    except Exception:
        failed = True
        raise
    finally:
        # Kept after a failure (not after Ctrl-C): the nodes' logs say what went wrong.
        if created and not keep and not failed:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"\nthe demo's files are in {base}", flush=True)


def _describe_sample(sample: Path) -> None:
    files = sum(1 for p in sample.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in sample.rglob("*") if p.is_file() and not p.is_symlink())
    _say(f"{files} files, {size / 1e6:.1f} MB, with a symlink, a hard link, an empty file,")
    _say("an empty directory, a duplicate photo and a file name that is not UTF-8")


async def _run_network(base: Path) -> int:
    sample = base / "sample-home"
    print(f"p2pbackup demo in {base}")

    _step(1, f"generate a sample tree at {sample}")
    make_sample_tree(sample)
    _describe_sample(sample)

    _step(2, f"start a local network of {_NODES} homes under {base / 'devnet'}")
    _say("each home is served by its own `p2pbackup serve` process on 127.0.0.1;")
    _say("each added the others' invite codes, so every two are friends both ways")
    async with open_devnet(base / "devnet", _NODES) as devnet:
        for node in devnet.nodes:
            _say(f"{node.name}  node {node.node_id}  at {node.address}  (pid {node.pid})")
        for warning in devnet.warnings:
            _say(f"warning: {warning}")
        owner, survivor = devnet.nodes[0], devnet.nodes[_SURVIVOR]
        friends = len(devnet.nodes) - 1

        _step(3, f"{owner.name} backs up the sample tree to its {friends} friends")
        async with operations.open_repository(owner.home) as repo:
            summary = await Backup(repo, progress=Progress("backup")).run([sample])
        for line in summary.lines():
            _say(line)
        _say(
            f"snapshot {summary.snapshot_id.hex()[:12]}: any {summary.k} of a pack's "
            f"{summary.n} shards restore it, so {summary.n - summary.k} friends may be lost"
        )
        _say(f"{owner.name}'s recovery key is in {owner.key_file} (mode 0600)")

        _step(4, f"{len(_KILLED)} friends' machines die")
        for index in _KILLED:
            node = devnet.nodes[index]
            await devnet.kill(index)
            _say(f"{node.name} (pid {node.pid}): SIGKILLed")

        _step(5, f"{owner.name}'s machine is lost too: only its recovery key is left")
        await devnet.kill(owner.index)
        _say(f"{owner.name} (pid {owner.pid}): SIGKILLed")
        shutil.rmtree(owner.home.path)
        _say(f"deleted its home directory {owner.home.path}")

        _step(6, f"recover on a new machine with the key and {survivor.name}'s invite code")
        new_home = Home(base / "new-machine-home")
        recovered = await operations.recover(
            new_home, owner.key_file.read_text(), [], operations.invite_nodes(survivor.invite)
        )
        _say(f"into {new_home.path}, as `p2pbackup recover --friend CODE` does:")
        for line in recovered.lines():
            _say(line)

        _step(7, "restore on the new machine")
        if not await _restore_and_compare(new_home, sample, base / "restore"):
            print("\ndemo FAILED: the restore differs from the original")
            return 1

    killed = " and ".join(devnet.nodes[i].name for i in _KILLED)
    print(
        f"\ndemo passed: with {killed} killed and {owner.name}'s home lost, its recovery key "
        f"and {survivor.name}'s invite code restored every byte."
    )
    return 0


async def _run_folders(base: Path) -> int:
    sample = base / "sample-home"
    home = Home(base / "p2pbackup-home")
    peers = [base / "peers" / f"peer-{i}" for i in range(1, _PEERS + 1)]
    print(f"p2pbackup demo in {base}")

    _step(1, f"generate a sample tree at {sample}")
    make_sample_tree(sample)
    _describe_sample(sample)

    _step(2, f"init a home at {home.path} with 3-of-6 shards")
    key = operations.init_home(home, operations.default_config(3, _PEERS))
    key_file = base / "recovery-key.txt"
    write_private_file(key_file, (key + "\n").encode())
    _say(f"recovery key (also saved 0600 in {key_file.name}):")
    _say(f"  {key}")

    _step(3, f"add {_PEERS} folder peers (stand-ins for friends' machines)")
    async with operations.open_repository(home) as repo:
        for peer in peers:
            peer.mkdir(parents=True)
            record = await operations.add_folder_peer(repo, peer)
            _say(f"{record.peer_id} at {peer}")

        _step(4, "back up the sample tree")
        summary = await Backup(repo, progress=Progress("backup")).run([sample])
        for line in summary.lines():
            _say(line)
        _say(f"snapshot {summary.snapshot_id.hex()[:12]}")

    _step(5, "destroy three of the six peers")
    shutil.rmtree(peers[1])
    _say(f"{peers[1].name}: deleted outright")
    _say(f"{peers[3].name}: {_corrupt_shards(peers[3])} shards corrupted in place")
    _say(f"{peers[4].name}: {_empty_peer(peers[4])} shards deleted")

    _step(6, "restore from the three that are left")
    if not await _restore_and_compare(home, sample, base / "restore-1"):
        print("\ndemo FAILED: the restore differs from the original")
        return 1

    _step(7, "lose the home directory too: only the recovery key is left")
    shutil.rmtree(home.path)
    _say(f"deleted {home.path}")
    new_home = Home(base / "new-machine-home")
    recovered = await operations.recover(new_home, key_file.read_text(), [peers[0]])
    _say(f"recover with the key and one peer ({peers[0].name}) into {new_home.path}")
    for line in recovered.lines():
        _say(line)

    _step(8, "restore on the 'new machine'")
    if not await _restore_and_compare(new_home, sample, base / "restore-2"):
        print("\ndemo FAILED: the restore after recovery differs from the original")
        return 1

    print(
        "\ndemo passed: with half the peers destroyed and the home lost, "
        "the recovery key restored every byte."
    )
    return 0
