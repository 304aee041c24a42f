"""What the browser does in the dashboard's test (tests/test_dashboard_e2e.py).

Run as a script: ``browser_steps.py BASE URL SOURCE TARGET SHOTS``; exits 0 when
every step saw what it should.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: How long the restore action's answer is held back (see _browse).
ANSWER_DELAY_MS = 3000


def _browse(base: str, url: str, source: Path, target: Path, shots: Path) -> None:
    """Every step, in order; an AssertionError at the first that fails."""
    from playwright.sync_api import Route, expect, sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            stranger = browser.new_page()
            refused = stranger.goto(base + "/")
            assert refused is not None and refused.status == 401
            expect(stranger.locator("h1")).to_have_text("No access")
            wrong = stranger.goto(base + "/?token=not-the-token")
            assert wrong is not None and wrong.status == 401

            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url)
            assert "token=" not in page.url  # the cookie holds it now
            expect(page.locator("#verdict")).to_have_text("safe")
            expect(page.locator("#peers-online")).to_have_text("3 of 3")
            page.screenshot(path=shots / "ui-overview.png", full_page=True)

            page.goto(base + "/peers")
            expect(page.locator("#peers tbody tr")).to_have_count(3)
            expect(page.locator("#peers")).to_contain_text("online")
            expect(page.locator(".qr svg")).to_be_visible()
            page.screenshot(path=shots / "ui-peers.png", full_page=True)

            # The action's answer ("running") is held back until the job has
            # surely finished, so the page hears "done" on its event stream
            # first: a late answer must not turn a finished job back to running.
            def answer_late(route: Route) -> None:
                answer = route.fetch()
                page.wait_for_timeout(ANSWER_DELAY_MS)
                route.fulfill(response=answer)

            page.route("**/api/restore", answer_late)
            page.goto(f"{base}/snapshots?snapshot=latest&path={source}")
            row = page.locator("#entries tr", has_text="notes.txt")
            row.locator("button.pick").click()
            page.fill('#restore-form input[name="target"]', str(target))
            page.click("#restore-form button")
            # The answer has been shown (its line goes beside the form, the
            # job's state with it): the state must still be the job's last.
            expect(page.locator("#restore-form + p.result")).to_have_class(
                "result good", timeout=60_000
            )
            expect(page.locator("#job")).to_have_attribute("data-state", "done", timeout=60_000)
            page.screenshot(path=shots / "ui-snapshots.png", full_page=True)

            page.goto(base + "/activity")
            plot = page.locator("svg.plot").first
            expect(plot).to_be_visible()
            assert int(plot.get_attribute("data-points") or 0) >= 1
            page.screenshot(path=shots / "ui-activity.png", full_page=True)

            page.goto(base + "/settings")
            expect(page.locator("#settings-form textarea")).to_contain_text("version = 1")
            page.screenshot(path=shots / "ui-settings.png", full_page=True)

            # An action without the token in its header (what a cross-site
            # form would send, with the cookie) is refused.
            status = page.evaluate(
                "fetch('/api/backup', {method: 'POST', body: '{}'}).then(r => r.status)"
            )
            assert status == 403
        finally:
            browser.close()


if __name__ == "__main__":
    base, url, source, target, shots = sys.argv[1:]
    _browse(base, url, Path(source), Path(target), Path(shots))
