"""Drives the web console in headless Chromium (selenium, Debian's chromium
and chromium-driver): the page loads, shows a registered instance, and turns
it critical live, without a reload, when its TTL check runs out.

usage: check_console.py <http base url of a node> [screenshot.png]
"""
import json
import os
import shutil
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base = sys.argv[1].rstrip("/")
shot = sys.argv[2] if len(sys.argv) > 2 else None


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


# One instance that stays passing, one whose TTL check the test lets run out.
call("PUT", "/v1/services/web/instances/web-1",
     {"address": "10.0.0.1", "port": 8080, "tags": ["v2"], "metadata": {"zone": "eu-1"}, "weight": 5})
call("PUT", "/v1/services/web/instances/web-ttl",
     {"address": "10.0.0.2", "port": 8081, "check": {"ttl": {"ttlMs": 2000}}})

options = Options()
for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=412,915"):
    options.add_argument(arg)
options.binary_location = os.environ.get("ROSTER_CHROMIUM") or shutil.which("chromium")
driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
try:
    driver.get(base + "/ui")
    wait = WebDriverWait(driver, 20, poll_frequency=0.1)

    # Read in one script: the page re-renders its tables on every event, so
    # an element found by one WebDriver call may be gone by the next.
    def cell(instance, selector, what):
        return driver.execute_script(
            "const c = document.querySelector(arguments[0]); return c ? c[arguments[1]] : null;",
            f'#instances tr[data-id="{instance}"] {selector}', what)

    def status(instance):
        return cell(instance, "td[data-status]", "textContent")

    wait.until(lambda d: status("web-1") == "passing")
    print("shown: web-1 passing")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#services tr[data-service="web"]'))
    summary = lambda: driver.execute_script("return document.getElementById('cluster-summary').textContent;")
    wait.until(lambda d: "leader" in summary())
    print("cluster:", summary())
    # The page is not reloaded from here on: the change must come by the watch.
    marker = driver.execute_script("window.notReloaded = true; return window.notReloaded;")
    assert marker
    wait.until(lambda d: status("web-ttl") == "critical")
    assert driver.execute_script("return window.notReloaded === true;"), "the page was reloaded"
    output = cell("web-ttl", "td.out", "textContent")
    print("turned critical live:", output)
    assert status("web-1") == "passing"
    if shot:
        driver.save_screenshot(shot)
        print("screenshot:", shot)
finally:
    driver.quit()
print("console ok")
