"""The dashboard in a real browser: headless Chromium against a running daemon.

Keeps a screenshot of the page in tests/artifacts/dashboard.png.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from probe import PROBE_HANDLER, Probe
from support import ROOT, BodyStaller, descendants, free_port, loaded, wait_until, write_function

ARTIFACTS = ROOT / "tests" / "artifacts"

GREET = """
def handler(event, context):
    print("greeting", event.get("name"))
    return {"greeting": "hello " + event.get("name", "nobody")}
"""
FAILS = """
def handler(event, context):
    raise ValueError("this one always fails")
"""
BROKEN = """
def handler(event, context)
    return 1
"""


@pytest.fixture
def browser(tmp_path: Path):
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.fail("chromium and chromedriver are missing: .ci/run installs the Debian "
                    "packages chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1440,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Given both binaries, Selenium looks nothing up on the network.
    os.environ["SE_OFFLINE"] = "true"
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver_pid = service.process.pid
    try:
        yield driver
    finally:
        started = descendants(driver_pid) | {driver_pid}
        driver.quit()
        wait_until(lambda: not [p for p in started if os.path.exists(f"/proc/{p}")
                                and open(f"/proc/{p}/stat").read().split()[2] != "Z"],
                   timeout=20, message="chromium and chromedriver to exit")


ROWS_SCRIPT = """return Object.fromEntries(Array.from(
    document.querySelectorAll("#functions-table tbody tr"),
    row => [row.getAttribute("data-function"), row.innerText]));"""


def listening(daemon) -> bool:
    try:
        return daemon.get("/healthz").status == 200
    except OSError:
        return False


def text_of(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def invoke_through_form(driver, payload: str) -> None:
    """Send `payload` with the dashboard's invoke form; wait until it succeeded."""
    field = driver.find_element("id", "invoke-payload")
    field.clear()
    field.send_keys(payload)
    driver.find_element("id", "invoke-submit").click()
    wait_until(lambda: text_of(driver, "invoke-status") == "succeeded", 30, message="the invocation")


def test_dashboard_shows_functions_invokes_through_the_form_and_charts_update(start_daemon, functions_dir,
                                                                              browser):
    write_function(functions_dir, "greet.py", GREET)
    write_function(functions_dir, "fails.py", FAILS)
    write_function(functions_dir, "broken.py", BROKEN)
    write_function(functions_dir, "scheduled.py", GREET)
    write_function(functions_dir, "scheduled.toml", """
        [[triggers]]
        type = "cron"
        schedule = "0 3 * * *"
    """)
    daemon = start_daemon(functions_dir)
    driver = browser
    driver.get(daemon.url + "/ui/")

    # Functions, their triggers and load errors.
    # Read in one script run: the page redraws the table as it polls, and rows
    # found by one WebDriver call may be gone by the next (a stale element).
    rows = lambda: driver.execute_script(ROWS_SCRIPT)
    wait_until(lambda: set(rows()) >= {"greet", "fails", "broken", "scheduled"}, 20,
               message="the functions table")
    assert "load error" in rows()["broken"] and "Runtime.UserCodeSyntaxError" in rows()["broken"]
    assert "cron" in rows()["scheduled"] and "0 3 * * *" in rows()["scheduled"]
    assert "ready" in rows()["greet"]
    wait_until(lambda: text_of(driver, "ready") == "ready", message="the readiness pill")
    chart = driver.find_element("id", "chart-rate")
    wait_until(lambda: chart.get_attribute("data-total") == "0", message="an empty rate chart")

    # Invoke through the form: the result, its log and a cold start are shown.
    driver.find_element("css selector", "#functions-table tr[data-function=greet] button").click()
    assert driver.find_element("id", "invoke-function").get_attribute("value") == "greet"
    invoke_through_form(driver, '{"name": "chromium"}')
    assert '"greeting": "hello chromium"' in text_of(driver, "invoke-output")
    assert "cold start" in text_of(driver, "invoke-meta")
    driver.find_element("css selector", "#invoke-log-wrap summary").click()
    assert "REPORT RequestId:" in text_of(driver, "invoke-log")

    # The charts pick the call up.
    wait_until(lambda: chart.get_attribute("data-total") == "1", 10, message="the rate chart to count it")
    latency = driver.find_element("id", "chart-latency")
    wait_until(lambda: int(latency.get_attribute("data-points") or 0) >= 1, message="a latency point")
    assert driver.find_elements("css selector", "#chart-rate rect.series-rate")

    # A failing function: the form says so and it lands in recent errors.
    select = driver.find_element("id", "invoke-function")
    select.find_element("css selector", "option[value=fails]").click()
    driver.find_element("id", "invoke-submit").click()
    wait_until(lambda: text_of(driver, "invoke-status").startswith("failed: ValueError"), 30,
               message="the failure")
    assert "this one always fails" in text_of(driver, "invoke-output")
    wait_until(lambda: "this one always fails" in text_of(driver, "errors-table"), 10,
               message="the recent errors table")
    wait_until(lambda: chart.get_attribute("data-total") == "2", 10, message="the second call")

    # The log tail carries the handler's own output, and worker states show.
    wait_until(lambda: "greeting chromium" in text_of(driver, "log-tail"), 10, message="the log tail")
    wait_until(lambda: any(state in rows()["greet"] for state in ("1 idle", "1 frozen")), 10,
               message="greet's worker state")

    # Nothing came from anywhere but the daemon, and the page logged no error.
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(url.startswith(daemon.url) for url in resources), resources
    problems = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert problems == []

    ARTIFACTS.mkdir(exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1440, min(max(height, 1000), 4000))
    driver.execute_script("window.scrollTo(0, 0)")
    wait_until(lambda: chart.get_attribute("data-total") == "2", message="charts redrawn")
    assert driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))


def test_with_auth_keys_the_dashboard_works_once_the_browser_signs_in(start_daemon, functions_dir,
                                                                     tmp_path, browser):
    write_function(functions_dir, "greet.py", GREET)
    config = tmp_path / "faasd.toml"
    config.write_text('[auth]\nkeys = { AKIDDASHBOARD = "dashboard-secret-value" }\n')
    daemon = start_daemon(functions_dir, config=config)
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    connection.request("GET", "/ui/")
    refused = connection.getresponse()
    refused.read()
    connection.close()
    assert refused.status == 401
    # A challenge of its own, so that browsers offer their Basic sign-in.
    assert 'Basic realm="faasd"' in refused.headers.get_all("WWW-Authenticate")
    # HTTP Basic with the key id and secret, as a browser sends after its prompt.
    browser.get(daemon.url.replace("http://", "http://AKIDDASHBOARD:dashboard-secret-value@") + "/ui/")
    wait_until(lambda: browser.find_elements("css selector", "#functions-table tr[data-function=greet]"),
               20, message="the functions table, authenticated")
    invoke_through_form(browser, '{"name": "basic auth"}')
    assert "hello basic auth" in text_of(browser, "invoke-output")
    assert not browser.find_element("id", "conn-bar").is_displayed()


def test_a_page_of_another_site_cannot_invoke_through_the_dashboard(start_daemon, functions_dir):
    """The browser keeps the dashboard's Basic sign-in and sends it with any
    request to it, a form another site posts included: such a post is refused."""
    write_function(functions_dir, "greet.py", GREET)
    keys = {"FAASD_AUTH_KEYS": "AKIDDASHBOARD=dashboard-secret-value"}
    daemon = start_daemon(functions_dir, env=keys)
    basic = "Basic " + base64.b64encode(b"AKIDDASHBOARD:dashboard-secret-value").decode()
    path = "/system/functions/greet/invoke"
    host = f"127.0.0.1:{daemon.port}"
    for headers in ({"Origin": "https://evil.example", "Content-Type": "text/plain"},
                    {"Origin": "null"},
                    {"Origin": f"http://127.0.0.1.evil.example:{daemon.port}"},
                    {"Sec-Fetch-Site": "cross-site"}):
        refused = daemon.post(path, {"name": "csrf"}, headers={"Authorization": basic, **headers})
        assert refused.status == 403, (headers, refused.status, refused.text)
        assert "another site" in refused.json()["message"]
    assert "greeting csrf" not in daemon.output()
    # Its own pages, clients without an Origin, and a proxy in front that names its host.
    for headers in ({"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"}, {},
                    {"Origin": "https://faasd.example.com", "X-Forwarded-Host": "faasd.example.com"}):
        ok = daemon.post(path, {"name": "own"}, headers={"Authorization": basic, **headers})
        assert ok.status == 200 and ok.json()["ok"] is True, (headers, ok.text)


def test_the_json_behind_the_dashboard(daemon):
    write_function(daemon.functions, "greet.py", GREET)
    loaded(daemon, "greet")

    ok = daemon.post("/system/functions/greet/invoke", {"name": "json"})
    assert ok.status == 200
    body = ok.json()
    assert body["ok"] is True and body["result"] == {"greeting": "hello json"}
    assert body["initMs"] is not None and f"REPORT RequestId: {body['requestId']}" in body["logTail"]
    bad = daemon.post("/system/functions/greet/invoke", "{not json")
    assert bad.status == 400 and "not valid JSON" in bad.json()["message"]
    missing = daemon.post("/system/functions/nothing/invoke", {})
    assert missing.status == 404 and missing.json()["message"] == "Function not found: nothing"
    queued = daemon.post("/system/functions/greet/invoke?type=Event", {"name": "later"})
    assert queued.status == 202 and queued.json()["queued"] is True

    activity = daemon.get("/system/activity").json()
    series = activity["series"]
    assert len(series["t"]) == activity["window_s"] // activity["bucket_s"]
    wait_until(lambda: sum(daemon.get("/system/activity").json()["series"]["invocations"]) == 2,
               message="both calls in the activity series")
    assert any(value is not None for value in activity["series"]["p50_ms"])

    lines = daemon.get("/system/log?after=0").json()
    assert any(line["message"] == "greeting json" and line["request_id"] == body["requestId"]
               for line in lines["lines"])
    later = daemon.get(f"/system/log?after={lines['last']}").json()
    assert all(line["seq"] > lines["last"] for line in later["lines"])
    assert daemon.get("/system/log?after=x").status == 400

    page = daemon.get("/ui/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert daemon.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert daemon.get("/ui/../faasd.toml").status == 404
    assert daemon.get("/ui/secrets.txt").status == 404


LONG_NAME = "a-function-whose-name-takes-all-the-sixty-four-characters-allows"
MANY_PATTERNS = """
    [[triggers]]
    type = "file"
    dir = "uploads"
    patterns = ["images/*.jpg", "images/*.jpeg", "images/*.png", "images/*.webp",
                "images/*.JPG", "images/*.JPEG", "images/*.PNG"]
"""
OVERFLOW_SCRIPT = """const wrap = document.querySelector("#functions-table").parentElement;
    return {table: [wrap.scrollWidth, wrap.clientWidth],
            page: [document.documentElement.scrollWidth, window.innerWidth]};"""


def test_the_functions_table_fits_a_laptop_screen_and_the_page_a_phone(start_daemon, functions_dir, browser):
    """Long names, long trigger lists and load errors wrap: the status and the
    Invoke button stay on screen without scrolling the table sideways."""
    assert len(LONG_NAME) == 64
    write_function(functions_dir, f"{LONG_NAME}.py", GREET)
    write_function(functions_dir, "thumbnail.py", GREET)
    write_function(functions_dir, "thumbnail.toml", MANY_PATTERNS)
    write_function(functions_dir, "broken.py", BROKEN)
    daemon = start_daemon(functions_dir)
    browser.set_window_size(1280, 900)
    browser.get(daemon.url + "/ui/")
    rows = lambda: browser.execute_script(ROWS_SCRIPT)
    wait_until(lambda: set(rows()) >= {LONG_NAME, "thumbnail", "broken"}, 20, message="the functions table")
    sizes = browser.execute_script(OVERFLOW_SCRIPT)
    assert sizes["table"][0] <= sizes["table"][1], sizes

    browser.set_window_size(390, 844)
    wait_until(lambda: browser.execute_script("return window.innerWidth") <= 400, message="a phone's width")
    sizes = browser.execute_script(OVERFLOW_SCRIPT)
    assert sizes["page"][0] <= sizes["page"][1], sizes
    # There the table scrolls within its card, its columns kept readable: a
    # short trigger is one line, not a column of letters.
    chip = browser.find_element("css selector", "tr[data-function=broken] .chip-http")
    assert chip.size["height"] < 2 * browser.execute_script(
        "return parseFloat(getComputedStyle(arguments[0]).lineHeight)", chip), chip.size
    # The header scrolls away: it covers no part of the card scrolled to.
    covered = browser.execute_script("""const card = document.getElementById("invoke-card");
        card.scrollIntoView();
        const box = card.getBoundingClientRect();
        return !card.contains(document.elementFromPoint(box.left + 20, box.top + 5));""")
    assert not covered


def test_a_trigger_shows_what_it_listens_for_and_why_it_is_not_running(start_daemon, functions_dir, browser):
    """An AMQP trigger without [amqp] url in the config is disabled: its chip
    says so and why, beside its exchange and routing keys; a running trigger
    is shown as it was."""
    write_function(functions_dir, "orders.py", GREET)
    write_function(functions_dir, "orders.toml", """
        [[triggers]]
        type = "amqp"
        exchange = "orders"
        exchange_type = "topic"
        routing_key = "order.created"
    """)
    write_function(functions_dir, "scheduled.py", GREET)
    write_function(functions_dir, "scheduled.toml", """
        [[triggers]]
        type = "cron"
        schedule = "0 3 * * *"
    """)
    daemon = start_daemon(functions_dir)
    state = daemon.function("orders")["triggers"][0]["state"]
    assert state["status"] == "disabled" and "no [amqp] url" in state["reason"]
    browser.get(daemon.url + "/ui/")
    rows = lambda: browser.execute_script(ROWS_SCRIPT)
    wait_until(lambda: set(rows()) >= {"orders", "scheduled"}, 20, message="the functions table")
    assert "orders order.created" in rows()["orders"]
    assert f"disabled: {state['reason']}" in rows()["orders"]
    assert browser.find_elements("css selector", "tr[data-function=orders] .chip-amqp.chip-down")
    assert "0 3 * * *" in rows()["scheduled"] and "disabled" not in rows()["scheduled"]
    assert not browser.find_elements("css selector", "tr[data-function=scheduled] .chip-down")


def test_an_amqp_trigger_whose_broker_cannot_be_reached_says_why(start_daemon, functions_dir, browser):
    """The chip of a trigger that waits for its broker carries the broker's
    error, as /readyz says it: the url with its password masked."""
    write_function(functions_dir, "orders.py", GREET)
    write_function(functions_dir, "orders.toml", """
        [[triggers]]
        type = "amqp"
        exchange = "orders"
    """)
    url = f"amqp://guest:broker-password@127.0.0.1:{free_port()}/"
    daemon = start_daemon(functions_dir, env={"FAASD_AMQP_URL": url}, wait=False)
    wait_until(lambda: listening(daemon), 20, message="the daemon")  # not ready: its broker is missing
    state = lambda: daemon.function("orders")["triggers"][0]["state"]
    wait_until(lambda: state()["status"] == "retrying", 20, message="the trigger to retry")
    reason = state()["reason"]
    assert reason.startswith("broker amqp://guest:***@127.0.0.1:") and "unreachable (" in reason, reason
    assert reason in daemon.get("/readyz").json()["checks"]["amqp"]["detail"]
    browser.get(daemon.url + "/ui/")
    rows = lambda: browser.execute_script(ROWS_SCRIPT)
    wait_until(lambda: "orders" in rows(), 20, message="the functions table")
    assert f"retrying: {reason}" in rows()["orders"]
    assert "broker-password" not in browser.page_source


SLEEPS = """
import time

def handler(event, context):
    time.sleep(event["seconds"])
    return {}
"""
Y_AXIS_SCRIPT = """return Array.from(document.querySelectorAll("#chart-latency text.axis-label"),
    label => label.textContent).filter(text => !/^(-\\d+m|now)$/.test(text));"""  # less the time axis


def test_the_latency_axis_speaks_one_unit(start_daemon, functions_dir, browser):
    """Every label of the latency axis is in one unit, chosen by its top:
    not "750 µs" under "1.00 ms", nor "5000 ms" under "10.0 s"."""
    write_function(functions_dir, "sleeps.py", SLEEPS)
    write_function(functions_dir, "sleeps.toml", "timeout_s = 10\n")
    daemon = start_daemon(functions_dir)
    browser.get(daemon.url + "/ui/")
    labels = lambda: browser.execute_script(Y_AXIS_SCRIPT)
    wait_until(lambda: len(labels()) == 5, 20, message="the latency axis")
    assert labels() == ["0", "0.25 ms", "0.5 ms", "0.75 ms", "1 ms"]

    assert daemon.invoke("sleeps", {"seconds": 5.5}).status == 200
    wait_until(lambda: labels()[-1] == "10 s", 10, message="the axis to reach the slow call")
    assert labels() == ["0", "2.5 s", "5 s", "7.5 s", "10 s"]


def test_a_function_that_cannot_load_shows_no_memory_figure(start_daemon, functions_dir, browser):
    """No worker ran it: the invoke form says so by its error, not by "max memory 0 MB"."""
    write_function(functions_dir, "broken.py", BROKEN)
    write_function(functions_dir, "greet.py", GREET)
    daemon = start_daemon(functions_dir)
    assert daemon.post("/system/functions/broken/invoke", {}).json()["maxMemoryUsedMb"] is None
    browser.get(daemon.url + "/ui/")
    wait_until(lambda: browser.find_elements("css selector", "#invoke-function option[value=broken]"), 20,
               message="the invoke form")
    browser.find_element("css selector", "#invoke-function option[value=greet]").click()
    invoke_through_form(browser, "{}")
    assert "max memory " in text_of(browser, "invoke-meta"), text_of(browser, "invoke-meta")
    browser.find_element("css selector", "#invoke-function option[value=broken]").click()
    browser.find_element("id", "invoke-submit").click()
    wait_until(lambda: text_of(browser, "invoke-status") == "failed: Runtime.UserCodeSyntaxError", 30,
               message="the failure")
    assert "MB" not in text_of(browser, "invoke-meta"), text_of(browser, "invoke-meta")


class InvokeBodyStaller(BodyStaller):
    """Stalls the body of an invocation."""

    STALLS = b"POST /system/functions/"


def test_an_invocation_refused_with_408_shows_as_a_refusal(start_daemon, functions_dir, browser):
    write_function(functions_dir, "greet.py", GREET)
    daemon = start_daemon(functions_dir, env={"FAASD_SERVER_IDLE_TIMEOUT_S": "1"})
    proxy = InvokeBodyStaller(("127.0.0.1", daemon.port))
    try:
        browser.get(f"http://127.0.0.1:{proxy.port}/ui/")
        wait_until(lambda: browser.find_elements("css selector", "#invoke-function option[value=greet]"), 20,
                   message="the invoke form")
        browser.find_element("id", "invoke-submit").click()
        wait_until(lambda: text_of(browser, "invoke-status") not in ("", "running…"), 20,
                   message="the answer")
        assert text_of(browser, "invoke-status") == "refused (408)"
        assert text_of(browser, "invoke-output") == "the request body stalled for over 1 s"
    finally:
        proxy.close()


def test_the_log_tail_begins_with_the_daemons_start(start_daemon, functions_dir):
    """The start-up's warnings and load errors are what an operator opening the
    dashboard most needs to see: the log tail has them, not only what came after."""
    write_function(functions_dir, "broken.py", BROKEN)
    daemon = start_daemon(functions_dir)
    messages = [line["message"] for line in daemon.get("/system/log?after=0").json()["lines"]]
    assert any(" starting: functions " in message for message in messages), messages
    assert any(message.startswith("function broken cannot load: Runtime.UserCodeSyntaxError")
               for message in messages), messages
    assert any(message.startswith("listening on ") for message in messages), messages


def test_a_poll_redraws_only_the_functions_that_changed(start_daemon, functions_dir, browser):
    """With some two hundred functions, redrawing every row at each poll froze
    the page for a tenth of a second every two seconds, and lost any text
    selected in the table: an unchanged function keeps its row."""
    write_function(functions_dir, "steady.py", GREET)
    write_function(functions_dir, "called.py", GREET)
    daemon = start_daemon(functions_dir)
    browser.get(daemon.url + "/ui/")
    rows = lambda: browser.execute_script(ROWS_SCRIPT)
    wait_until(lambda: set(rows()) >= {"steady", "called"}, 20, message="the functions table")
    browser.execute_script("""for (const row of document.querySelectorAll("#functions-table tbody tr"))
        row.drawnBefore = true;""")
    assert daemon.invoke("called", {"name": "x"}).status == 200
    wait_until(lambda: any(state in rows()["called"] for state in ("1 idle", "1 frozen")), 10,
               message="the called function's worker in its row")
    kept = browser.execute_script("""return Object.fromEntries(Array.from(
        document.querySelectorAll("#functions-table tbody tr"),
        row => [row.getAttribute("data-function"), row.drawnBefore === true]));""")
    assert kept == {"steady": True, "called": False}


def test_the_functions_table_filters_by_name_across_polls(start_daemon, functions_dir, browser):
    """With some two hundred functions the table is many screens tall: a box
    above it keeps the functions whose name holds its text, while the page
    polls and functions change, come and go."""
    for name in ("orders-create", "orders-cancel", "thumbnail"):
        write_function(functions_dir, f"{name}.py", GREET)
    daemon = start_daemon(functions_dir)
    browser.get(daemon.url + "/ui/")
    rows = lambda: browser.execute_script(ROWS_SCRIPT)
    wait_until(lambda: len(rows()) == 3, 20, message="the functions table")
    assert text_of(browser, "functions-summary") == "3 functions"

    browser.find_element("id", "functions-filter").send_keys("Orders")
    wait_until(lambda: set(rows()) == {"orders-create", "orders-cancel"}, 5, message="the filtered table")
    assert text_of(browser, "functions-summary") == "2 of 3 functions"

    # A poll that finds functions changed, added or gone keeps the filter.
    assert daemon.invoke("thumbnail", {"name": "x"}).status == 200
    write_function(functions_dir, "orders-refund.py", GREET)
    write_function(functions_dir, "mailer.py", GREET)
    (functions_dir / "orders-cancel.py").unlink()
    wait_until(lambda: text_of(browser, "functions-summary") == "2 of 4 functions", 20,
               message="the next polls")
    assert set(rows()) == {"orders-create", "orders-refund"}

    browser.find_element("id", "functions-filter").send_keys("-nothing")
    wait_until(lambda: "No function's name holds this text." in text_of(browser, "functions-table"), 5,
               message="no match")
    assert text_of(browser, "functions-summary") == "0 of 4 functions"
    browser.find_element("id", "functions-filter").clear()
    browser.execute_script('document.getElementById("functions-filter").dispatchEvent(new Event("input"))')
    wait_until(lambda: set(rows()) == {"orders-create", "orders-refund", "thumbnail", "mailer"}, 5,
               message="every function again")


def test_after_a_restart_the_log_tail_shows_the_new_daemons_lines(start_daemon, functions_dir, tmp_path,
                                                                   browser):
    write_function(functions_dir, "greet.py", GREET)
    first = start_daemon(functions_dir)
    browser.get(first.url + "/ui/")
    for n in range(10):  # the first daemon's log runs further than the second's will
        assert first.invoke("greet", {"name": f"call {n}"}).status == 200
    wait_until(lambda: "greeting call 9" in text_of(browser, "log-tail"), 10, message="the first daemon's lines")
    first.stop()

    others = tmp_path / "other-functions"
    others.mkdir()
    write_function(others, "second.py", BROKEN)
    start_daemon(others, port=first.port, data=tmp_path / "data-2")
    wait_until(lambda: "function second cannot load" in text_of(browser, "log-tail"), 20,
               message="the restarted daemon's start in the log tail")


def test_after_a_restart_whose_log_runs_further_the_log_tail_starts_over(start_daemon, functions_dir,
                                                                        tmp_path, browser):
    """A restarted daemon numbers its lines from 1 again; by the page's next
    poll it may have logged more than the old one had. Its start id tells
    the page: the tail starts over with the new daemon's first line."""
    write_function(functions_dir, "greet.py", GREET)
    first = start_daemon(functions_dir)
    browser.get(first.url + "/ui/")
    wait_until(lambda: "function greet loaded" in text_of(browser, "log-tail"), 20,
               message="the first daemon's lines")
    first_log = first.get("/system/log?after=0").json()
    first.stop()

    others = tmp_path / "other-functions"
    others.mkdir()
    for n in range(40):  # one line each as they load: this start says more than the first daemon did
        write_function(others, f"other-{n}.py", GREET)
    second = start_daemon(others, port=first.port, data=tmp_path / "data-2")
    second_log = second.get("/system/log?after=0").json()
    assert second_log["start"] != first_log["start"]
    assert second_log["last"] > first_log["last"] + 10, (first_log["last"], second_log["last"])
    wait_until(lambda: f"starting: functions {others}" in text_of(browser, "log-tail"), 20,
               message="the restarted daemon's first line in the log tail")
    assert "function greet loaded" not in text_of(browser, "log-tail")


def test_a_warnings_level_stands_apart_from_its_source_in_the_log_tail(start_daemon, functions_dir, browser):
    write_function(functions_dir, "warns.py", """
        import logging

        def handler(event, context):
            logging.getLogger().warning("disk almost full")
            return {}
    """)
    write_function(functions_dir, "warns.toml", 'log_format = "JSON"\n')
    daemon = start_daemon(functions_dir)
    assert daemon.invoke("warns").status == 200
    browser.get(daemon.url + "/ui/")
    wait_until(lambda: "disk almost full" in text_of(browser, "log-tail"), 20, message="the warning")
    # Where the level's text ends against where the source beside it begins.
    crowded = browser.execute_script("""return Array.from(document.querySelectorAll("#log-tail .lvl"))
        .filter(level => {
            const text = document.createRange();
            text.selectNodeContents(level);
            return text.getBoundingClientRect().right + 4 > level.nextElementSibling.getBoundingClientRect().left;
        }).map(level => level.textContent);""")
    assert crowded == []


def test_the_async_queue_column_tells_waiting_events_from_the_running_one(start_daemon, functions_dir,
                                                                         browser):
    """queue.depth counts the events not done yet, the running one included:
    the column says how many wait and how many run, as /system/functions does."""
    probe = Probe()
    try:
        write_function(functions_dir, "held.toml", f'timeout_s = 60\nconcurrency = 1\n[env]\nPROBE = "{probe.url}"\n')
        write_function(functions_dir, "held.py", PROBE_HANDLER)
        daemon = start_daemon(functions_dir)
        for payload in ({"id": "first", "gate": "g"}, {"id": "second"}):
            queued = daemon.invoke("held", payload, **{"X-Amz-Invocation-Type": "Event"})
            assert queued.status == 202, queued.text
        probe.wait_for(1, "start", id="first")
        queue = daemon.function("held")["queue"]
        assert queue["depth"] == 2 and queue["running"] == 1
        browser.get(daemon.url + "/ui/")
        rows = lambda: browser.execute_script(ROWS_SCRIPT)
        wait_until(lambda: "held" in rows(), 20, message="the functions table")
        wait_until(lambda: "1 running" in rows()["held"], 10, message="the running event")
        assert "1 queued" in rows()["held"], rows()["held"]
        probe.release("g")
        probe.wait_for(1, "end", id="second")
    finally:
        probe.close()
