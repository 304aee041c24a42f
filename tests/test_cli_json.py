"""--json on init, invite and recover, and the human units of command lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

from p2pbackup.engine.progress import human_bytes, human_rate, plural

from .cli_helpers import KEY_RE, cli_ok, make_source, make_world


def test_init_invite_and_recover_speak_json(tmp_path: Path) -> None:
    shown = json.loads(cli_ok("--home", tmp_path / "a", "init", "--json").stdout)
    assert KEY_RE.fullmatch(shown["recovery_key"]) and (shown["k"], shown["n"]) == (3, 6)
    assert len(shown["node_id"]) == 40 and shown["home"] == str(tmp_path / "a")
    key_file = tmp_path / "key.txt"
    written = json.loads(
        cli_ok(
            "--home", tmp_path / "b", "init", "--shards", "2/4", "--recovery-key-file", key_file,
            "--json",
        ).stdout
    )  # fmt: skip
    assert "recovery_key" not in written and written["recovery_key_file"] == str(key_file)
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"

    invite = json.loads(
        cli_ok("--home", tmp_path / "a", "invite", "--address", "192.0.2.7:47470", "--json").stdout
    )
    assert invite["node_id"] == shown["node_id"] and invite["addresses"] == ["192.0.2.7:47470"]
    assert invite["code"].startswith("p2pb")

    world = make_world(tmp_path / "w", k=1, n=2)
    world.backup(make_source(tmp_path / "src", big=50_000))
    recovered = json.loads(
        cli_ok(
            "--home", tmp_path / "new", "recover", "--recovery-key-file", world.key_file,
            "--peer-dir", world.peers[0], "--json",
        ).stdout
    )  # fmt: skip
    assert recovered["snapshots"] == 1 and recovered["peers_reached"] == 2
    assert recovered["packs_restorable"] == recovered["packs"] > 0
    assert recovered["problems"] == [] and recovered["home"] == str(tmp_path / "new")


def test_one_helper_says_sizes_rates_and_counts() -> None:
    assert human_bytes(512) == "512 B" and human_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert human_rate(10 * 1024 * 1024, 2.0) == "5.0 MiB/s" and human_rate(5, 0) == "0 B/s"
    assert [plural(n, "pack") for n in (0, 1, 2)] == ["0 packs", "1 pack", "2 packs"]
    assert plural(2, "directory") == "2 directories" and plural(3, "key") == "3 keys"
    assert plural(1, "fifo or device", "fifos and devices") == "1 fifo or device"


def test_command_lines_use_singulars_and_binary_rates(tmp_path: Path) -> None:
    world = make_world(tmp_path, k=1, n=2)
    source = tmp_path / "src"
    source.mkdir()
    (source / "one.txt").write_text("one file")
    lines = world.ok("backup", source).lines
    assert "1 directory, 0 symlinks" in lines[0]
    assert " in 2 packs (" in lines[2]  # data and metadata
    assert lines[3].endswith("/s)") and "MB/s" not in lines[3]
    listed = world.ok("snapshots").lines[0]
    assert "  1 file  " in listed
    target = tmp_path / "out"
    restored = world.ok("restore", "latest", "--target", target).lines[1]
    assert restored.startswith("restored 1 file, ") and "/s)" in restored
    assert os.listdir(target)
    checked = world.ok("check").lines
    assert checked[0].startswith(("2 packs:", "3 packs:"))  # data, metadata, index
