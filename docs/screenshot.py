"""Screenshot of a study's HTML report for the README (headless Chromium from the system packages).

    python docs/screenshot.py runs/demo/report/report.html docs/figures/demo-report.png

Chromium is found as `chromium`, `chromium-browser` or `google-chrome`; where none is installed the
script says so and exits 0 without writing (e.g. `apt-get install chromium` to get one).
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main(page: str, out: str, width: int = 1300, height: int = 1500) -> int:
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        print("no Chromium found (chromium, chromium-browser, google-chrome): screenshot skipped; install one to make it")
        return 0
    page_path = Path(page).resolve()
    if not page_path.is_file():
        print(f"{page} does not exist: run `diffinv demo` first (it writes runs/demo/report/report.html)")
        return 2
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no first-run state, nothing kept
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
                        f"--screenshot={Path(out).resolve()}", f"--window-size={width},{height}", page_path.as_uri()],
                       check=True, capture_output=True, timeout=120)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
