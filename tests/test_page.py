"""leaderboard.html in a real headless browser (Chromium from the Debian packages, driven by Selenium), opened from
the file system: it renders, every table and plot leaderboard.json implies is on it, the images are embedded
(nothing is fetched from anywhere), and each track is its own section.

Nothing reaches the network: the page has no external reference (asserted), and Chromium runs without background
networking, component updates, sync or first-run tasks, in a fresh profile.
"""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from leaderboard_fixtures import write_root
from platebench.harness.cli import main

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                 reason="needs Chromium: apt-get install -y chromium chromium-driver")]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    pytest.importorskip("selenium", reason="needs selenium: pip install selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp = tmp_path_factory.mktemp("page")
    a = write_root(tmp / "a", methods=("erm", "m1", "m2", "t1+tta"), seeds=(0, 1))
    b = str(tmp / "b")
    shutil.copytree(a, b)  # a second source: every row names both
    out = tmp / "lb"
    assert main(["leaderboard", "--records", a, b, "--out", str(out)]) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    try:
        url = (out / "leaderboard.html").resolve().as_uri()
        driver.get(url)
        yield driver, board, url
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _all(driver, css):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def test_the_page_renders_from_the_file_system(page):
    driver, board, url = page
    assert url.startswith("file://") and driver.current_url == url
    assert driver.execute_script("return document.readyState") == "complete"
    assert driver.title == "platebench leaderboard"
    assert _all(driver, "h1")[0].text == "platebench leaderboard"
    assert all(t.is_displayed() for t in _all(driver, "table"))


def test_every_table_and_plot_of_leaderboard_json_is_on_the_page(page):
    driver, board, _ = page
    assert board["overall"] and board["cost"] and board["sweeps"]  # the fixture exercises every kind
    counts = {kind: len(_all(driver, f"table[data-table='{kind}']"))
              for kind in ("leaderboard", "sweep", "overall", "cost", "hparams")}
    assert counts == {"leaderboard": len(board["tables"]), "sweep": len(board["sweeps"]),
                      "overall": len(board["overall"]), "cost": len(board["cost"]), "hparams": 1}
    tests = {(t["dataset"], t["split_scheme"], t["track"], t["split"]) for t in board["tables"]
             if t["split_role"] == "test"}
    id_ood = sum(1 for ds, sc, tr, sp in tests if sp.startswith("id_") and (ds, sc, tr, sp[3:]) in tests)
    plots = {kind: len(_all(driver, f"img[data-plot='{kind}']"))
             for kind in ("accuracy", "sweep", "id-vs-ood", "critical-difference", "cost")}
    assert plots == {"accuracy": len(board["tables"]), "sweep": len(board["sweeps"]), "id-vs-ood": id_ood,
                     "critical-difference": len(board["overall"]), "cost": len(board["cost"])}
    assert len(_all(driver, "img")) == sum(plots.values())
    # each table's rows: one per row of leaderboard.json, in its order (the page groups the tables by track)
    by_track = sorted(board["tables"], key=lambda t: t["track"])
    for el, t in zip(_all(driver, "table[data-table='leaderboard']"), by_track, strict=True):
        assert el.get_attribute("data-split") == t["split"] and el.get_attribute("data-track") == t["track"]
        methods = [tr.find_elements("css selector", "td")[1].text
                   for tr in el.find_elements("css selector", "tbody tr")]
        assert len(methods) == len(t["rows"])
        assert all(m.startswith(r["method"]) for m, r in zip(methods, t["rows"]))


def test_images_are_embedded_decoded_and_nothing_is_external(page):
    driver, _, _ = page
    imgs = _all(driver, "img")
    assert imgs
    for img in imgs:
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
    refs = driver.execute_script(
        "return Array.from(document.querySelectorAll('[src],[href]')).map(e => e.getAttribute('src') || "
        "e.getAttribute('href'))")
    assert all(r.startswith(("data:", "#")) for r in refs), [r for r in refs if not r.startswith(("data:", "#"))]
    assert not _all(driver, "script, link, iframe, object, embed")


def test_each_track_is_its_own_section(page):
    driver, board, _ = page
    sections = {s.get_attribute("data-track"): s for s in _all(driver, "section.track")}
    assert set(sections) == {t["track"] for t in board["tables"]} == {"standard", "tta"}
    for track, section in sections.items():
        tables = section.find_elements("css selector", "table")
        assert {t.get_attribute("data-track") for t in tables} == {track}
        want = sum(1 for t in board["tables"] if t["track"] == track)
        assert len(section.find_elements("css selector", "table[data-table='leaderboard']")) == want
        names = {tr.find_elements("css selector", "td")[1].text
                 for t in section.find_elements("css selector", "table[data-table='leaderboard']")
                 for tr in t.find_elements("css selector", "tbody tr")}
        if track == "standard":
            assert not any("+tta" in n for n in names)
        else:  # tta methods, and the baseline borrowed from the standard track as an unranked reference
            assert {n for n in names if "+tta" not in n} == {"erm (standard track, baseline)"}
    # the cost and overall tables name both sources in their Sources column
    cost = sections["standard"].find_elements("css selector", "table[data-table='cost']")[0]
    assert cost.find_elements("css selector", "th")[-1].text == "Sources"
    assert {tr.find_elements("css selector", "td")[-1].text for tr in cost.find_elements("css selector", "tbody tr")} \
        == {"S1, S2"}
