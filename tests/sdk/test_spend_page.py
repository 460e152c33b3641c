"""The spend page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`) driven by
Selenium against the gateway binary, serving a ledger this test writes (several projects, tags, keys and models
over this month's days, with lines the page must leave out). The numbers the page renders, for each grouping,
today and this month, must be `mantlegate usage report`'s over the same ledger; requests sent through the gateway
while the page is open must show up on it; the admin token must guard it; no key material may reach the page.

Set MANTLEGATE_SPEND_SCREENSHOT=PATH to keep the page's screenshot there (docs/spend-page.png is made so); it is
always written to the test's temporary directory."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from harness import UPSTREAM_KEY, UPSTREAM_KEY_ENV, gateway_binary, sha256_hex, start_gateway

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ADMIN_TOKEN = "spend-page-admin-token-5b2f0c7e9d"
KEYS = {  # name -> (key, project)
    "chat-service": ("mg-spend-chat-key-0001", "Chat-Prod"),
    "search-batch": ("mg-spend-search-key-0002", "Search"),
    "labs-notebooks": ("mg-spend-labs-key-0003", "Labs"),
    "ops-scripts": ("mg-spend-ops-key-0004", None),  # no project: its requests are unattributed
}
PROJECTS = {
    "Chat-Prod": {"Team": "chat", "CostCenter": "CC-1001", "Environment": "Production"},
    "Chat-Dev": {"Team": "chat", "CostCenter": "CC-1001", "Environment": "Development"},
    "Search": {"Team": "search", "CostCenter": "CC-2040", "Environment": "Production"},
    "Labs": {"Team": "research", "CostCenter": "CC-3100", "Environment": "Research"},
}
MODELS = {"openai.gpt-oss-120b": (0.15, 0.60), "openai.gpt-5.4": (2.75, 16.50), "openai.gpt-oss-20b": (0.075, 0.30)}
GROUPINGS = ["project", "tag:Team", "model", "key"]
WAIT = 30


def config(mock_url: str, ledger: Path, token_file: Path) -> str:
    text = f"""
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "1s"
admin_token_file = "{token_file}"

[upstream]
base_url = "{mock_url}"
auth = "api_key"
api_key_env = "{UPSTREAM_KEY_ENV}"

[callers]
auth = "keys"

[attribution]
unattributed = "reject"

[taxonomy]
required_tags = ["Team", "CostCenter"]

[metering]
ledger_path = "{ledger}"
"""
    for name, tags in PROJECTS.items():
        inline = ", ".join(f'{k} = "{v}"' for k, v in tags.items())
        text += f'\n[[projects]]\nname = "{name}"\nid = "proj_{name.lower().replace("-", "_")}"\ntags = {{ {inline} }}\n'
    for name, (key, project) in KEYS.items():
        owner = f'project = "{project}"\n' if project else ""
        selects = 'may_select = ["Chat-Dev"]\n' if name == "chat-service" else ""
        text += f'\n[[keys]]\nname = "{name}"\nsha256 = "{sha256_hex(key)}"\n{owner}{selects}'
    return text


def ledger_line(at: dt.datetime, key: str | None, project: str, model: str | None, i: int, **extra) -> str:
    input_tokens, output_tokens = 900 + 37 * i, 150 + 11 * (i % 17)
    price = MODELS.get(model)
    cost = round((input_tokens * price[0] + output_tokens * price[1]) / 1e6, 12) if price else None
    line = {
        "time": at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z",
        "request_id": f"spend-{i}",
        "key": key,
        "route": "chat.completions",
        "model": model,
        "stream": i % 2 == 0,
        "status": 200,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_input_tokens": 64 * (i % 3),
        "reasoning_tokens": 8 * (i % 5),
        "cost_usd": cost,
        "duration_ms": 500.0,
        "ttfb_ms": 100.0,
        "complete": i % 13 != 0,
        "project": project,
        "project_id": f"proj_{project.lower().replace('-', '_')}",
        "tags": dict(sorted(PROJECTS[project].items())),
        **extra,
    }
    return json.dumps(line, separators=(",", ":")) + "\n"


def write_ledger(ledger: Path, now: dt.datetime) -> None:
    """Lines on every day of this month so far (rotated files for past days, the ledger file for today, as the
    gateway leaves them), and on last month's last day, which neither the page nor the report over this month
    may count; a limit's refusal (no spend) and an unpriced model among them."""
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    owners = [(k, p) for k, (_, p) in KEYS.items() if p] + [("chat-service", "Chat-Dev")]
    files: dict[Path, list[str]] = {}
    i = 0
    day = month - dt.timedelta(days=1)
    while day <= now:
        end = min(day + dt.timedelta(days=1), now - dt.timedelta(seconds=1))
        path = ledger if day.date() == now.date() else ledger.with_name(f"usage.{day:%Y-%m-%d}.jsonl")
        count = 12 + day.day % 5
        for n in range(count):
            at = day + (end - day) * (n + 1) / (count + 1)
            key, project = owners[(i + day.day) % len(owners)]
            model = [*MODELS, "mystery.unpriced", None][i % 5]
            files.setdefault(path, []).append(ledger_line(at, key, project, model, i))
            i += 1
        files[path].append(ledger_line(end, "chat-service", "Chat-Prod", "openai.gpt-5.4", i,
                                       refused_by="project:Chat-Prod/usd_per_day", status=429))
        i += 1
        day += dt.timedelta(days=1)
    for path, lines in files.items():
        path.write_text("".join(lines))


def usage_report(ledger: Path, group_by: str, since: str) -> list[dict]:
    out = subprocess.run(
        [str(gateway_binary()), "usage", "report", "--ledger", str(ledger), "--group-by", group_by.removeprefix("tag:"),
         "--since", since, "--format", "json"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(out.stdout)


# The rendered tables, read whole in one script so a refresh cannot tear them.
READ_TABLE = """
const table = document.getElementById(arguments[0]);
const head = table.querySelector("thead th");
return {
  title: head ? head.textContent : null,
  rows: [...table.querySelectorAll("tbody tr[data-group]")].map((tr) =>
    Object.fromEntries([...tr.querySelectorAll("td")].map((td) => [td.dataset.col, td.textContent]))),
};
"""

INTEGERS = ["requests", "input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens"]


def number(text: str) -> float:
    return float(text.replace("$", "").replace(",", ""))


def assert_same(rendered: list[dict], report: list[dict], what: str) -> None:
    """The page's rows are the report's: the same groups in the same order, the same counts, and the same cost to
    the digits shown."""
    assert [r["group"] for r in rendered] == [r["group"] for r in report], what
    for shown, want in zip(rendered, report):
        for column in INTEGERS:
            assert number(shown[column]) == want[column], f"{what}: {shown['group']} {column}"
        decimals = len(shown["cost_usd"].split(".")[1])
        assert abs(number(shown["cost_usd"]) - want["cost_usd"]) <= 0.5 * 10**-decimals + 1e-12, (
            f"{what}: {shown['group']} cost {shown['cost_usd']} against {want['cost_usd']}")


def assert_no_key_material(html: str) -> None:
    """No caller key, nor its hash, nor the upstream key or the admin token, is in the page."""
    for secret in [ADMIN_TOKEN, UPSTREAM_KEY, *(key for key, _ in KEYS.values()), *(sha256_hex(k) for k, _ in KEYS.values())]:
        assert secret not in html


def pick(browser, group_by: str) -> None:
    """Clicks the grouping's button, found and clicked in one script: the page redraws its buttons as it refreshes."""
    clicked = browser.execute_script(
        "const b = document.querySelector(`#groups button[data-group=\"${arguments[0]}\"]`); if (b) b.click(); return !!b;",
        group_by,
    )
    assert clicked, f"no button for {group_by}"


@pytest.fixture
def browser(request, tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("headless Chromium is needed: apt-get install chromium chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1400",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    request.addfinalizer(driver.quit)
    return driver


@pytest.fixture
def served(request, mock, tmp_path):
    ledger = tmp_path / "ledger" / "usage.jsonl"
    ledger.parent.mkdir()
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    write_ledger(ledger, now)
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MANTLEGATE") and k != "RUST_LOG"}
    env[UPSTREAM_KEY_ENV] = UPSTREAM_KEY
    gateway = start_gateway(request, tmp_path, config(mock.url, ledger, token_file), env)
    return gateway, ledger


def chat(gateway, key: str, model: str = "openai.gpt-oss-120b") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=WAIT)


def test_the_spend_page_shows_the_ledgers_numbers_live_behind_the_admin_token(served, browser, tmp_path):
    gateway, ledger = served
    admin = gateway.admin_url
    wait = WebDriverWait(browser, WAIT)

    # Guarded: the API and the metrics need the token; the page's own code loads, asks for it, and shows nothing.
    assert httpx.get(f"{admin}/api/spend").status_code == 401
    assert httpx.get(f"{admin}/metrics").status_code == 401
    assert httpx.get(f"{admin}/readyz").status_code == 200
    browser.get(f"{admin}/")
    wait.until(lambda b: b.find_element(By.ID, "login").is_displayed())
    assert not browser.find_element(By.ID, "main").is_displayed()
    assert "$" not in browser.find_element(By.TAG_NAME, "body").text
    browser.find_element(By.ID, "token").send_keys("not-the-admin-token-at-all")
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    wait.until(lambda b: b.find_element(By.ID, "login-error").text == "That token was refused.")
    browser.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    wait.until(lambda b: b.find_element(By.ID, "main").is_displayed())
    # Kept for the tab only, sent as a header: never in the address bar (nor in any URL the page fetched).
    assert browser.execute_script("return sessionStorage.getItem('mantlegate-admin-token')") == ADMIN_TOKEN
    assert ADMIN_TOKEN not in browser.current_url

    status = httpx.get(f"{admin}/api/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    today, month = status["today"], status["month"]

    def check(group_by: str) -> None:
        """Picks `group_by` on the page and compares both tables with the report, once the page shows it."""
        pick(browser, group_by)
        title = group_by[4:] if group_by.startswith("tag:") else group_by.capitalize()
        for table, since in (("month", month), ("today", today)):
            report = usage_report(ledger, group_by, since)
            shown = {}

            def matches(b) -> bool:
                shown.update(b.execute_script(READ_TABLE, table))
                return shown["title"] == title and [r["group"] for r in shown["rows"]] == [r["group"] for r in report]

            try:
                wait.until(matches)
            except Exception:
                pytest.fail(f"{group_by} {table}: the page shows {shown} where the report has {report}")
            assert_same(shown["rows"], report, f"{group_by}, {table}")

    for group_by in GROUPINGS:
        check(group_by)
    # Everything was counted: every project and model, today and other days, and nothing of last month's.
    month_rows = usage_report(ledger, "project", month)
    assert {r["group"] for r in month_rows} == set(PROJECTS)
    assert len(usage_report(ledger, "project", "100d")) > 0
    assert sum(r["requests"] for r in usage_report(ledger, "project", "100d")) > sum(r["requests"] for r in month_rows)
    month_cost = sum(r["cost_usd"] for r in month_rows)
    assert abs(number(browser.find_element(By.ID, "month-cost").text) - month_cost) < 5e-5

    # The chart: a bar a day of the month, adding up to the month, today's marked.
    bars = browser.execute_script(
        "return [...document.querySelectorAll('#chart rect')].map(r => [r.dataset.day, +r.dataset.cost, r.classList.value])")
    first = dt.date.fromisoformat(month[:10])
    days_in_month = ((first.replace(day=28) + dt.timedelta(days=4)).replace(day=1) - first).days
    assert len(bars) == days_in_month
    assert abs(sum(cost for _, cost, _ in bars) - month_cost) < 1e-6
    assert [day for day, _, kind in bars if kind == "today"] == [today[:10]]

    # Requests sent now show up without a restart: three for Chat-Prod, and one nothing attributes.
    pick(browser, "project")
    before = {r["group"]: r for r in usage_report(ledger, "project", month)}
    for _ in range(3):
        assert chat(gateway, KEYS["chat-service"][0]).status_code == 200
    refused = chat(gateway, KEYS["ops-scripts"][0])
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "project_required"
    want = before["Chat-Prod"]["requests"] + 3

    def chat_prod_requests(b) -> bool:
        rows = b.execute_script(READ_TABLE, "month")["rows"]
        return any(r["group"] == "Chat-Prod" and number(r["requests"]) == want for r in rows)

    wait.until(chat_prod_requests)
    wait.until(lambda b: b.find_element(By.ID, "unattributed").text == "1")
    assert "1 refused (project_required)" in browser.find_element(By.ID, "unattributed-detail").text
    wait.until(lambda b: re.match(r"^\d+\.\d req/s$", b.find_element(By.ID, "rate").text))
    # Once the ledger has the new lines, the page and the report agree again, to the token.
    deadline = time.monotonic() + WAIT
    while sum(r["requests"] for r in usage_report(ledger, "project", month)) < sum(
        r["requests"] for r in before.values()
    ) + 3:
        assert time.monotonic() < deadline, "the ledger never got the new requests"
        time.sleep(0.05)  # polling the ledger file, with a deadline
    check("key")
    # Grouped by key, the page names keys, and holds no key material at all.
    assert_no_key_material(browser.page_source)
    assert all(name in browser.page_source for name in ("chat-service", "search-batch", "labs-notebooks"))
    check("project")

    # The CSV the page downloads is the report's CSV.
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    page_csv = httpx.get(f"{admin}/api/spend.csv", params={"group_by": "tag:CostCenter", "since": month}, headers=headers)
    assert page_csv.status_code == 200 and page_csv.headers["content-type"].startswith("text/csv")
    report_csv = subprocess.run(
        [str(gateway_binary()), "usage", "report", "--ledger", str(ledger), "--group-by", "CostCenter", "--since",
         month, "--format", "csv"], capture_output=True, text=True, check=True).stdout
    page_rows, report_rows = (list(csv.reader(io.StringIO(t))) for t in (page_csv.text, report_csv))
    assert [r[:6] + r[7:] for r in page_rows] == [r[:6] + r[7:] for r in report_rows]
    assert all(abs(float(a[6]) - float(b[6])) < 1e-9 for a, b in zip(page_rows[1:], report_rows[1:]))

    # Nothing but this listener was reached, and no key material is anywhere on the page.
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(url.startswith(admin + "/") for url in resources), resources
    assert all(ADMIN_TOKEN not in url for url in resources)
    assert_no_key_material(browser.page_source)

    shot = tmp_path / "spend-page.png"
    pick(browser, "tag:Team")
    wait.until(lambda b: b.execute_script(READ_TABLE, "month")["title"] == "Team")
    browser.save_screenshot(str(shot))
    if os.environ.get("MANTLEGATE_SPEND_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["MANTLEGATE_SPEND_SCREENSHOT"])
