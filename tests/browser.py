"""Headless Chromium (Debian's package) for tests that check what a person would see in a report."""

import re
import subprocess
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
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
_PROBE = (
    "<script>addEventListener('load', () => { for (const img of document.images) "
    "img.dataset.width = img.naturalWidth; });</script>"
)


def decoded_image_widths(page: Path, scratch: Path) -> list[int]:
    """Open `page` offline and return each image's decoded width (0 for an image the browser could not decode)."""
    probe_page = scratch / "probe.html"
    probe_page.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={scratch / 'profile'}", "--dump-dom", probe_page.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    return [int(width) for width in re.findall(r'data-width="(\d+)"', dom)]
