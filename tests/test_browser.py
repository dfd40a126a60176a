"""The real pages in headless Chromium: what a browser renders, saved as screenshots under
test-output/browser/ for people to look at."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine's own probe runs it: no sandbox as root, no network chatter of its own.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine")


@pytest.fixture
def output_dir(request) -> Path:
    directory = Path(os.environ.get("DQM_TEST_OUTPUT", request.config.rootpath / "test-output"))
    directory = directory / "browser"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


async def chromium(tmp_path: Path, *arguments: str) -> str:
    """Run headless Chromium (asynchronously: the server under test runs in this loop)."""
    process = await asyncio.create_subprocess_exec(
        CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *arguments, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    return stdout.decode(errors="replace")


async def test_status_page_in_chromium(control_room, tmp_path, output_dir):
    """Chromium renders the status page with its banner, silent agent and invalid file."""
    client, files = control_room
    url = f"http://127.0.0.1:{client.port}/status"
    dom = await chromium(tmp_path, "--dump-dom", url)
    assert "▲ WARNING" in dom
    assert "SILENT" in dom
    assert files["trd_bad"]["filename"] in dom
    screenshot = output_dir / "status.png"
    screenshot.unlink(missing_ok=True)
    await chromium(tmp_path, "--window-size=1400,900", f"--screenshot={screenshot}", url)
    assert screenshot.read_bytes().startswith(PNG_SIGNATURE)
    assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one


async def test_file_page_with_previews_in_chromium(control_room, tmp_path, output_dir):
    """Chromium renders a file's page with its SVG previews."""
    client, files = control_room
    url = f"http://127.0.0.1:{client.port}/files/{files['emc_start']['filename']}"
    dom = await chromium(tmp_path, "--dump-dom", url)
    assert dom.count("<svg") == 4
    screenshot = output_dir / "file.png"
    screenshot.unlink(missing_ok=True)
    await chromium(tmp_path, "--window-size=1400,1100", f"--screenshot={screenshot}", url)
    assert screenshot.read_bytes().startswith(PNG_SIGNATURE)
    assert screenshot.stat().st_size > 20_000
