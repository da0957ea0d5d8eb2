"""The dashboard in a real headless browser (Debian's chromium driven by Playwright)
against the running service of ``dashboard_data``.

Each test opens a fresh browser context, fails on any console error or uncaught
exception of the page, and saves full-page screenshots under
``test-artifacts/dashboard/`` (``DINOCLUSTER_ARTIFACTS`` moves it). Where
chromium is missing the tests skip, except with ``DINOCLUSTER_REQUIRE_BROWSER=1``
(``.ci/run`` sets it), where they fail.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clustering_service.api.dashboard.conftest import API_KEY, MODEL
from tests.support.processes import ROOT

CHROMIUM = os.environ.get("DINOCLUSTER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("DINOCLUSTER_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"
#: a DEC job that runs until it is cancelled, reporting progress every epoch
ENDLESS_DEC = {
    "hidden_dims": [64, 64],
    "latent_dim": 5,
    "pretrain_epochs": 20_000,
    "cluster_epochs": 2,
}


def _unavailable(reason: str) -> None:
    message = f"the dashboard's browser tests need {reason}"
    if os.environ.get("DINOCLUSTER_REQUIRE_BROWSER") == "1":
        pytest.fail(message + "; DINOCLUSTER_REQUIRE_BROWSER=1 requires them to run")
    pytest.skip(message + " (apt-get install chromium)")


# session-scoped, like ``dashboard_data``, so that pytest checks it first: no service is
# started for tests that will skip
@pytest.fixture(scope="session")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        _unavailable(f"chromium at {CHROMIUM}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package (pip install -e '.[dev]')")
    return CHROMIUM


# module-scoped: Playwright's synchronous API keeps an event loop of its own while it
# runs, which must not outlive these tests
@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A page of a fresh context with the API key in its tab, recording console errors."""

    def __init__(self, browser: Any, url: str, with_key: bool = True) -> None:
        self.url = url
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.context.set_default_timeout(20_000)
        if with_key:
            key = json.dumps(API_KEY)
            self.context.add_init_script(f"sessionStorage.setItem('dinocluster.apiKey', {key})")
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on(
            "console",
            lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None,
        )
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def open(self, fragment: str) -> Any:
        self.page.goto(f"{self.url}/dashboard#{fragment}")
        return self.page

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"\nscreenshot: {path}")

    def wait_until(self, script: str, arg: Any = None, timeout: float = 20.0) -> None:
        """Poll ``script`` (a JS function of ``arg``) until it is true. (Playwright's own
        ``wait_for_function`` evaluates strings in the page, which its CSP forbids.)"""
        deadline = time.monotonic() + timeout
        while not self.page.evaluate(script, arg):
            assert time.monotonic() < deadline, (
                f"still false after {timeout} s: {script}; page errors: {self.errors}"
            )
            time.sleep(0.05)

    def all_images_loaded(self, selector: str) -> int:
        """Waits until every image matching ``selector`` has loaded; returns their count."""
        self.wait_until(
            "s => [...document.querySelectorAll(s)].every(i => i.complete && i.naturalWidth > 0)",
            selector,
        )
        return self.page.locator(selector).count()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_page(chromium: str, dashboard_data: Any, browser: Any) -> Iterator[Any]:
    pages: list[Page] = []

    def make(with_key: bool = True) -> Page:
        page = Page(browser, dashboard_data.url, with_key)
        pages.append(page)
        return page

    yield make
    for page in pages:
        page.close()


def test_key_prompt_models_and_aliases(open_page: Any, dashboard_data: Any) -> None:
    view = open_page(with_key=False)
    page = view.open("/models")
    # the service needs a key: the page asks before calling the API
    page.locator("#key-form").wait_for(state="visible")
    view.screenshot("key-prompt")
    page.fill("#key-input", API_KEY)
    page.click("#key-form button[type=submit]")
    row = page.locator("table.models tbody tr", has_text=MODEL)
    row.wait_for()
    assert "production → v2" in row.inner_text()
    view.screenshot("models")

    row.locator("a", has_text=MODEL).click()
    page.locator("table.versions").wait_for()
    versions = page.locator("table.versions tbody tr")
    assert versions.count() == 3
    v1 = dashboard_data.versions[1]
    first = page.locator("table.versions tr[data-version='1']").inner_text()
    assert "kmeans" in first and f"{v1['metrics']['silhouette']:.3f}" in first
    assert f"{v1['metrics']['acc']:.3f}" in first  # the photos have labels
    history = page.locator("table.alias-history tbody tr")
    assert history.count() == 2 and "production" in history.first.inner_text()
    view.screenshot("model")
    assert view.errors == []


def test_version_gallery_and_projection(open_page: Any, dashboard_data: Any) -> None:
    client = dashboard_data.service.client
    clusters = client.get(f"/v1/models/{MODEL}/versions/1/clusters").json()["clusters"]
    projection = client.get(f"/v1/models/{MODEL}/versions/1/projection").json()
    view = open_page()
    page = view.open(f"/models/{MODEL}/versions/1")
    page.locator(".gallery").wait_for()

    # every cluster with its size and its exemplars' thumbnails, actually decoded
    cards = page.locator(".gallery .cluster")
    assert cards.count() == len(clusters)
    for c in clusters:
        card = page.locator(f".gallery .cluster[data-cluster='{c['cluster']}']")
        assert f"{c['size']} items" in card.inner_text()
    view.wait_until("() => document.querySelectorAll('.gallery .pending').length === 0")
    exemplars = [i for c in clusters for i in c["exemplars"]]
    with_image = [i for i in exemplars if i not in dashboard_data.removed]
    assert len(with_image) > len(clusters)
    assert view.all_images_loaded(".gallery img.thumb") == len(with_image)
    # the exemplars deleted since version 1 was made are named, without an image
    assert sorted(page.locator(".gallery .nothumb").all_inner_texts()) == sorted(
        set(exemplars) - set(with_image)
    )

    # the scatter plot: one point per projected item, two items deleted since
    dots = page.locator("svg.scatter circle")
    assert dots.count() == len(projection["points"]) > 0
    note = page.locator(".projection-note").inner_text()
    assert f"{len(dashboard_data.removed)} items were deleted" in note
    colours = page.eval_on_selector_all(
        "svg.scatter circle", "ds => ds.map(d => d.getAttribute('fill'))"
    )
    assert len(set(colours)) == len({p["cluster"] for p in projection["points"]})

    # hovering a point shows its image
    dot = dots.nth(len(projection["points"]) // 2)
    dot.scroll_into_view_if_needed()
    box = dot.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    tooltip = page.locator("#tooltip")
    tooltip.locator("img").wait_for()
    assert view.all_images_loaded("#tooltip img") == 1
    caption = tooltip.locator(".caption").inner_text()
    assert caption.startswith("photos/") and "cluster" in caption
    view.screenshot("version-1-hover")
    page.mouse.move(5, 5)
    tooltip.wait_for(state="hidden")
    assert page.locator("#stability").count() == 0  # version 1 has no parent
    assert view.errors == []


def test_update_stability_view(open_page: Any, dashboard_data: Any) -> None:
    client = dashboard_data.service.client
    transitions = client.get(f"/v1/models/{MODEL}/versions/2/transitions?limit=24").json()
    v2 = dashboard_data.versions[2]
    view = open_page()
    page = view.open(f"/models/{MODEL}/versions/2")
    stability = page.locator("#stability")
    stability.wait_for()
    text = stability.inner_text()
    kept = f"{100 * transitions['kept_fraction']:.1f}%"
    assert kept in text and "Stability against its parent v1" in text
    shared = transitions["items_shared"]
    added, removed = transitions["items_added"], transitions["items_removed"]
    assert f"{shared} / {added} / {removed}" in text
    # a bar per cluster's centroid shift, a cell per (from, to) pair of the matrix
    assert stability.locator("svg.bars rect").count() == len(v2["stability"]["centroid_shift"])
    assert stability.locator("svg.matrix rect.cell").count() == len(transitions["transitions"])
    moved = stability.locator("table.moved tbody tr")
    assert moved.count() == len(transitions["moved_items"])
    if transitions["moved_items"]:
        view.wait_until("() => document.querySelectorAll('table.moved .pending').length === 0")
        assert view.all_images_loaded("table.moved img.thumb") == moved.count()
    else:
        assert "No item changed cluster" in text
    view.all_images_loaded(".gallery img.thumb")
    view.screenshot("version-2-stability")
    assert view.errors == []


def test_live_job_progress(open_page: Any, dashboard_data: Any) -> None:
    """A job started while the jobs page is open: its progress advances in the page
    (from the events stream), and the page's Cancel button stops it."""
    client = dashboard_data.service.client
    view = open_page()
    page = view.open("/jobs")
    page.locator("table.jobs tbody tr").first.wait_for()
    r = client.post(
        "/v1/jobs",
        json={
            "type": "train",
            "dataset_id": dashboard_data.dataset_id,
            "algorithm": "dec",
            "model_name": "live",
            "n_clusters": 4,
            "params": ENDLESS_DEC,
        },
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    try:
        row = page.locator(f"tr[data-job-id='{job_id}']")
        row.locator(".live").wait_for(timeout=30_000)  # running, followed live
        seen: list[Any] = []
        deadline = time.monotonic() + 60
        while len(seen) < 3 and time.monotonic() < deadline:
            shown, value = row.evaluate(
                "r => [r.dataset.progress, r.querySelector('progress').value]"
            )
            state, stage, epoch, fraction = json.loads(shown)
            if state == "running" and fraction is not None and (stage, epoch) not in seen:
                assert value == pytest.approx(fraction)  # the bar shows the stage's share done
                seen.append((stage, epoch))
            time.sleep(0.05)
        assert len(seen) >= 3, f"progress did not advance twice: {seen}"
        assert "epoch" in row.locator(".detail").inner_text()
        view.screenshot("jobs-live")

        row.locator("button.cancel").click()
        row.locator(".state.cancelled").wait_for(timeout=30_000)
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
    finally:
        client.post(f"/v1/jobs/{job_id}/cancel")
    view.screenshot("jobs-cancelled")
    assert view.errors == []


def test_compare_any_two_versions(open_page: Any, dashboard_data: Any) -> None:
    """Version 3 was trained afresh (no parent): no stability view until another version
    is chosen to compare with; then the items that changed cluster, with their images."""
    client = dashboard_data.service.client
    transitions = client.get(
        f"/v1/models/{MODEL}/versions/3/transitions?from_version=2&limit=24"
    ).json()
    assert transitions["moved"] > 0  # 4 clusters now, 6 before: items of 4 and 5 moved
    view = open_page()
    page = view.open(f"/models/{MODEL}/versions/3")
    page.locator(".gallery").wait_for()
    assert page.locator("#stability").count() == 0
    page.select_option("#compare", "2")
    stability = page.locator("#stability")
    stability.wait_for()
    assert "Compared with v2" in stability.inner_text()
    assert page.url.endswith("/versions/3?from=2")
    cells = stability.locator("svg.matrix rect.cell.moved")
    moved_pairs = [x for x in transitions["transitions"] if x["from_cluster"] != x["to_cluster"]]
    assert cells.count() == len(moved_pairs) > 0
    rows = stability.locator("table.moved tbody tr")
    assert rows.count() == len(transitions["moved_items"])
    first = transitions["moved_items"][0]
    assert first["item_id"] in rows.first.inner_text()
    view.wait_until("() => document.querySelectorAll('table.moved .pending').length === 0")
    assert view.all_images_loaded("table.moved img.thumb") == rows.count()
    # the centroid shift is the update's own report: not there between unrelated versions
    assert "against its parent only" in stability.inner_text()
    view.screenshot("version-3-compared-with-2")
    assert view.errors == []
