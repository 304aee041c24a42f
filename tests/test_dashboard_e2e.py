"""The dashboard in a real headless browser (Debian's Chromium, driven by Playwright)
against a devnet node: what a user sees and does, and what a stranger is refused.

With ``P2PBACKUP_UI_SCREENSHOTS=DIR`` the screenshots of each page go to DIR
(``docs/img`` for the user guide's); else to the test's temporary directory.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import trio

from p2pbackup.app.devnet import open_devnet
from p2pbackup.ui import access

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER = str(Path(__file__).with_name("browser_steps.py"))


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Chromium is not installed")
async def test_the_dashboard_in_a_browser(tmp_path: Path) -> None:
    pytest.importorskip("playwright")
    source = tmp_path / "documents"
    (source / "letters").mkdir(parents=True)
    (source / "notes.txt").write_text("remember the milk\n")
    (source / "letters" / "dear.txt").write_text("dear friend\n")
    target = tmp_path / "restored"
    shots = Path(os.environ.get("P2PBACKUP_UI_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    async with open_devnet(tmp_path / "net", 4) as devnet:
        home = devnet.nodes[0].home
        backup = await trio.run_process(
            [sys.executable, "-m", "p2pbackup.cli", "--home", str(home.path), "backup", source],
            capture_stdout=True,
            capture_stderr=True,
        )
        assert backup.returncode == 0, backup.stderr
        base = access.read_address(home.path)
        assert base is not None
        url = access.dashboard_url(base, access.load_token(home.path))
        # In a process of its own: Playwright runs an asyncio loop, which
        # the DHT's trio-asyncio would take over in this one.
        browsing = await trio.run_process(
            [sys.executable, BROWSER, base, url, str(source), str(target), str(shots)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert browsing.returncode == 0, browsing.stderr.decode()
    restored = list(target.rglob("notes.txt"))
    assert [p.read_text() for p in restored] == ["remember the milk\n"]
    assert not list(target.rglob("dear.txt"))  # only the file asked for
    for name in ("overview", "peers", "snapshots", "activity", "settings"):
        assert (shots / f"ui-{name}.png").stat().st_size > 10_000
