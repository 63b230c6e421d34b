"""Drives the web console in headless Chromium (selenium, Debian's chromium
and chromium-driver): the page loads, shows a registered instance, shows one
registered while it watches, and turns that one critical live, without a
reload, when its TTL check runs out; its buttons put an instance into
maintenance and back and deregister one; its charts count what the watch
delivered; its members table shows each follower's round trip.

usage: check_console.py <base url of a node> [--screenshot PNG]
                        [--cacert CA.pem] [--token SECRET] [--namespace NS]

With --cacert (an https:// base) Chromium trusts that CA as a user's browser
does once it is imported: through an NSS database (certutil, Debian's
libnss3-tools) in a temporary HOME. No certificate error is ignored, so the
page loads only if the node's chain verifies against that CA. With --token
(a cluster with [auth]) the console must first be refused, then list the
services once the token is typed into its box. With --namespace (an existing
namespace), switching to it in the page's namespace list shows that
namespace's services alone, and switching back shows `default`'s again.
"""
import argparse
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

parser = argparse.ArgumentParser()
parser.add_argument("base")
parser.add_argument("--screenshot")
parser.add_argument("--cacert")
parser.add_argument("--token")
parser.add_argument("--namespace")
args = parser.parse_args()
base = args.base.rstrip("/")
tls = ssl.create_default_context(cafile=args.cacert) if args.cacert else None


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    if args.token:
        req.add_header("Authorization", "Bearer " + args.token)
    with urllib.request.urlopen(req, timeout=10, context=tls) as r:
        return json.load(r)


def trusting(cacert):
    """A HOME whose NSS database trusts `cacert` to issue server certificates
    (removed when the script ends)."""
    home = tempfile.TemporaryDirectory(prefix="roster-console-")
    db = "sql:" + os.path.join(home.name, ".pki", "nssdb")
    os.makedirs(os.path.join(home.name, ".pki", "nssdb"))
    certutil = shutil.which("certutil")
    if not certutil:
        sys.exit("certutil (libnss3-tools) is needed to trust the test CA")
    subprocess.run([certutil, "-d", db, "-N", "--empty-password"], check=True)
    subprocess.run([certutil, "-d", db, "-A", "-t", "C,,", "-n", "roster test CA", "-i", cacert], check=True)
    return home


# One instance that stays passing; another, whose TTL check the test lets
# run out, once the page is watching.
call("PUT", "/v1/services/web/instances/web-1",
     {"address": "10.0.0.1", "port": 8080, "tags": ["v2"], "metadata": {"zone": "eu-1"}, "weight": 5})

options = Options()
for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=412,915"):
    options.add_argument(arg)
options.binary_location = os.environ.get("ROSTER_CHROMIUM") or shutil.which("chromium")
env = dict(os.environ)
if args.cacert:
    home = trusting(args.cacert)
    env["HOME"] = home.name
driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver"), env=env))
try:
    driver.get(base + "/ui")
    wait = WebDriverWait(driver, 20, poll_frequency=0.1)
    if args.cacert:
        assert driver.execute_script("return window.isSecureContext && location.protocol;") == "https:"
        print("served over HTTPS, the chain trusted")

    # Read in one script: the page re-renders its tables on every event, so
    # an element found by one WebDriver call may be gone by the next.
    def cell(instance, selector, what):
        return driver.execute_script(
            "const c = document.querySelector(arguments[0]); return c ? c[arguments[1]] : null;",
            f'#instances tr[data-id="{instance}"] {selector}', what)

    def status(instance):
        return cell(instance, "td[data-status]", "textContent")

    if args.token:
        error = lambda: driver.execute_script("return document.getElementById('error').textContent;")
        wait.until(lambda d: "UNAUTHENTICATED" in error())
        assert not driver.find_elements(By.CSS_SELECTOR, "#services tr"), "services listed without a token"
        print("refused without the token:", error())
        # Typed as a person would; the box takes it when it loses focus.
        driver.find_element(By.ID, "token").send_keys(args.token, Keys.TAB)
    wait.until(lambda d: status("web-1") == "passing")
    print("shown: web-1 passing")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#services tr[data-service="web"]'))
    summary = lambda: driver.execute_script("return document.getElementById('cluster-summary').textContent;")
    wait.until(lambda d: "leader" in summary())
    print("cluster:", summary())
    # The page is not reloaded from here on: the change must come by the watch.
    marker = driver.execute_script("window.notReloaded = true; return window.notReloaded;")
    assert marker
    call("PUT", "/v1/services/web/instances/web-ttl",
         {"address": "10.0.0.2", "port": 8081, "check": {"ttl": {"ttlMs": 2000}}})
    wait.until(lambda d: status("web-ttl") == "passing")
    print("shown: web-ttl passing")
    wait.until(lambda d: status("web-ttl") == "critical")
    assert driver.execute_script("return window.notReloaded === true;"), "the page was reloaded"
    output = cell("web-ttl", "td.out", "textContent")
    print("turned critical live:", output)
    assert status("web-1") == "passing"

    # The operator's tools: maintenance and deregistration from the page,
    # the changes charted, the members' health as the leader sees it.
    def click(instance, cls):
        driver.execute_script(
            "document.querySelector(arguments[0]).click();",
            f'#instances tr[data-id="{instance}"] button.{cls}')

    click("web-1", "maint")
    wait.until(lambda d: status("web-1") == "maintenance")
    stored = [i for i in call("GET", "/v1/services/web")["instances"] if i["id"] == "web-1"][0]
    assert stored["maintenance"] == "from the console", stored
    assert stored["status"] == "HEALTH_STATUS_MAINTENANCE", stored
    print("maintenance from the page:", cell("web-1", "td.out", "textContent"))
    click("web-1", "maint")
    wait.until(lambda d: status("web-1") == "passing")
    click("web-ttl", "dereg")
    wait.until(lambda d: status("web-ttl") is None)
    assert all(i["id"] != "web-ttl" for i in call("GET", "/v1/services/web")["instances"])
    print("deregistered from the page")
    totals = lambda: driver.execute_script(
        "return ['registrations', 'health', 'deliveries']"
        ".map(k => Number(document.getElementById('chart-' + k).dataset.total || 0));")
    wait.until(lambda d: all(t > 0 for t in totals()))
    print("charted (registrations, health changes, deliveries):", totals())
    rtts = lambda: driver.execute_script(
        "return [...document.querySelectorAll('#members td[data-rtt]')].map(c => c.dataset.rtt).filter(r => r);")
    wait.until(lambda d: len(rtts()) >= 2)
    print("members' round trips (ms):", rtts())
    if args.namespace:
        ns = args.namespace
        call("PUT", f"/v1/namespaces/{ns}/services/api/instances/api-1", {"address": "10.0.0.3", "port": 9090})
        services = lambda: driver.execute_script(
            "return [...document.querySelectorAll('#services tr[data-service]')].map(r => r.dataset.service);")
        choose = lambda name: driver.execute_script(
            "const s = document.getElementById('namespace');"
            "s.value = arguments[0]; s.dispatchEvent(new Event('change')); return s.value;", name)
        wait.until(lambda d: ns in d.execute_script(
            "return [...document.getElementById('namespace').options].map(o => o.value);"))
        assert choose(ns) == ns
        wait.until(lambda d: services() == ["api"])
        assert ns in driver.execute_script("return document.getElementById('picked-title').textContent;")
        print("namespace", ns, "shows:", services())
        assert choose("default") == "default"
        wait.until(lambda d: services() == ["web"])
        print("back in default:", services())
    if args.screenshot:
        driver.save_screenshot(args.screenshot)
        print("screenshot:", args.screenshot)
finally:
    driver.quit()
print("console ok")
