"""The design document the code cites exists, and every citation points at a section it has."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DESIGN = REPO / "docs/DESIGN.md"
CITATION = re.compile(r"(\S*)DESIGN\.md(?:\)?,?\s+sections?\s+(\d+)(?:\s+and\s+(\d+))?)?")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    return [REPO / n for n in names if n.endswith((".py", ".md", ".js", ".sh", ".toml", ".txt", ".ini", ".json"))
            and (REPO / n).is_file()]


def test_every_design_citation_points_at_an_existing_section():
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", DESIGN.read_text(encoding="utf-8"), flags=re.M)}
    assert sections >= {2, 3, 4, 5, 6, 7}, sections
    cited, problems = 0, []
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for line_no, line in enumerate(text.splitlines(), start=1):
            for match in CITATION.finditer(line):
                prefix, numbers = match.group(1), [n for n in match.group(2, 3) if n]
                where = f"{path.relative_to(REPO)}:{line_no}"
                cited += 1
                if path != DESIGN and not prefix.endswith("docs/"):
                    problems.append(f"{where}: cites {match.group(0)!r}, not docs/DESIGN.md")
                problems += [f"{where}: docs/DESIGN.md has no section {n}" for n in numbers
                             if int(n) not in sections]
    assert cited >= 10, f"only {cited} citations found: is the scan reading the sources?"
    assert not problems, "\n".join(problems)
