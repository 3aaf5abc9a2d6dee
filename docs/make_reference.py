"""Write docs/reference.md from the CLI (run after changing a config field: `python docs/make_reference.py`)."""

from pathlib import Path

from diffinv.cli import reference

if __name__ == "__main__":
    out = Path(__file__).with_name("reference.md")
    out.write_text(reference())
    print(f"wrote {out}")
