"""The shift crew's pages: what they show for a prepared catalog, and their JSON twins."""

from __future__ import annotations

import asyncio
import base64
import itertools
import re

import numpy as np
import pytest
import uproot

from dqm_daemon.app import create_app
from dqm_daemon.appkeys import SETTINGS

from .conftest import FAST_CLOCK, RUN_START, TOKEN, dqm_headers, make_settings
from .rootfiles import th1f, write_one_histogram_file


async def test_status_json_tells_the_whole_story(control_room):
    """The status twin reports the banner, agents, runs, uploads and latest files."""
    client, files = control_room
    status = await (await client.get("/status.json")).json()
    assert status["level"] == "WARNING"
    assert any(reason.startswith("agent EMC silent in run 100") for reason in status["reasons"])
    assert "1 invalid file(s) in the last hour" in status["reasons"]
    agents = {agent["agent"]: agent for agent in status["agents"]}
    assert agents["EMC"]["silent"] is True and agents["EMC"]["in_run"] is True
    assert agents["TPC"]["silent"] is False and agents["TPC"]["ended_at"] is not None
    assert agents["MFT"]["in_run"] is False and agents["MFT"]["silent"] is False
    assert agents["EMC"]["files"] == 2 and agents["EMC"]["interval_seconds"] is not None
    (upload,) = status["uploads"]
    assert (upload["agent"], upload["run"], upload["uploader"]) == ("LIVE", 102, "emc-agent")
    assert upload["received_bytes"] > 0
    latest = {row["name"]: row for row in status["latest_files"]}
    assert latest[files["trd_bad"]["filename"]]["state"] == "invalid"
    assert latest[files["emc_start"]["filename"]]["object_count"] == 7
    runs = {run["run"]: run for run in status["runs"]}
    assert sorted(runs[100]["agents"].split()) == ["EMC", "TPC"]
    assert runs[100]["files"] == 4 and runs[100]["started_at"]
    # TPC ended run 100, EMC (started, silent) did not: the run has not ended.
    assert runs[100]["ended_at"] is None and runs[100]["agents_ended"] == 1
    assert runs[100]["agents_started"] == 2
    assert runs[101]["files"] == 2
    assert status["inspection"]["workers_running"] == status["inspection"]["workers"] == 2
    assert status["disk"]["free_bytes"] > 0 and status["version"]


async def test_status_page_shows_it_to_the_crew(control_room):
    """The HTML page shows the same facts in words and symbols, never the token."""
    client, files = control_room
    response = await client.get("/status")
    assert response.status == 200
    html = await response.text()
    assert '<meta http-equiv="refresh" content="5">' in html
    assert "▲ WARNING" in html
    assert "agent EMC silent in run 100" in html
    assert "✖ SILENT" in html
    assert files["trd_bad"]["filename"] in html and "✖ invalid" in html
    assert "LIVE" in html  # the upload in progress
    assert 'href="/runs/100"' in html
    assert "ago" in html
    assert TOKEN not in html


async def test_a_broken_file_neither_starts_nor_ends_a_run(aiohttp_client, data_dir,
                                                            one_histogram_file):
    """A file answered 400 (not ROOT) with dataStatus 2 does not end its agent's run, nor does
    one with dataStatus 1 open a run: the crew would read "ended" while the agent, still in its
    run, goes unwatched. The sound end of data that follows ends it."""
    client = await aiohttp_client(create_app(make_settings(data_dir, **FAST_CLOCK)))
    broken = b"not a ROOT file" * 100

    async def send(content: bytes, run: int, second: int, data_status: int) -> int:
        response = await client.post(
            "/rest/api/files", data=content,
            headers=dqm_headers(run=run, timestamp=RUN_START + second, agent="EMC",
                                dataStatus=str(data_status)))
        return response.status

    assert await send(one_histogram_file, 600, 0, 1) == 200
    assert await send(broken, 600, 1, 2) == 400
    (agent,) = (await (await client.get("/runs/600.json")).json())["agents"]
    assert (agent["started_at"] is not None, agent["ended_at"]) == (True, None)
    (emc,) = (await (await client.get("/status.json")).json())["agents"]
    assert emc["in_run"] is True
    assert await send(broken, 601, 2, 1) == 400
    (agent,) = (await (await client.get("/runs/601.json")).json())["agents"]
    assert agent["started_at"] is None
    assert await send(one_histogram_file, 600, 3, 2) == 200
    (agent,) = (await (await client.get("/runs/600.json")).json())["agents"]
    assert agent["ended_at"] is not None


async def test_root_redirects_to_status(client):
    """The bare address leads to the status page."""
    response = await client.get("/", allow_redirects=False)
    assert (response.status, response.headers["Location"]) == (302, "/status")


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_root_with_a_token_is_the_overwatch_token_probe(aiohttp_client, data_dir, method):
    """Scripts test a token as on the Overwatch receiver: `/` with it answers 400 "Not
    implemented" past the token check (even where the pages need a password), without it or
    with a wrong one the token check's answer."""
    client = await aiohttp_client(
        create_app(make_settings(data_dir, pages_basic_auth="crew:secret")))
    answers = {}
    for token in (TOKEN, "not-the-token", None):
        headers = {} if token is None else {"token": token}
        response = await client.request(method, "/", headers=headers, allow_redirects=False)
        answers[token] = (response.status, (await response.json())["message"])
    assert answers == {
        TOKEN: (400, "Not implemented"),
        "not-the-token": (401, "Received token, but it is invalid!"),
        None: (401, "Must pass a token!" if method == "POST"
               else "These pages need a user name and password"),
    }


async def test_fresh_daemon_is_ok(client):
    """With nothing wrong the banner says OK."""
    status = await (await client.get("/status.json")).json()
    assert (status["level"], status["reasons"]) == ("OK", [])
    assert "✔ OK" in await (await client.get("/status")).text()


async def test_low_disk_is_an_error(aiohttp_client, data_dir):
    """Free disk under the reserve turns the banner to ERROR, saying why."""
    client = await aiohttp_client(create_app(make_settings(data_dir, disk_reserve_bytes=1 << 60)))
    status = await (await client.get("/status.json")).json()
    assert status["level"] == "ERROR"
    assert "free disk below the reserve: uploads are refused" in status["reasons"]


async def test_file_page_with_previews(control_room, data_dir):
    """A file's page shows its metadata, object tree and SVG previews of its histograms."""
    client, files = control_room
    name = files["emc_start"]["filename"]
    html = await (await client.get(f"/files/{name}")).text()
    # hits/time, clusters/size, clusters/energy_vs_size as step lines, hits/occupancy as a map
    assert html.count("<svg") == 4
    assert html.count('class="step"') == 3 and "heat map 40×40" in html
    assert "Hit time" in html and "time (ns)" in html and "Occupancy" in html
    assert f'href="/rest/api/files/{name}"' in html
    assert "TTree" in html and "2 branches" in html
    twin = await (await client.get(f"/files/{name}.json")).json()
    assert twin["file"]["name"] == name and twin["histograms"] == 4
    with uproot.open(data_dir / name) as root_file:
        expected_time = root_file["hits/time"].values().tolist()
        expected_map = root_file["hits/occupancy"].values().tolist()
    assert twin["previews"]["hits/time"]["values"] == expected_time
    assert twin["previews"]["hits/occupancy"]["values"] == expected_map
    assert twin["previews"]["hits/occupancy"]["axes"][1]["title"] == "row"


async def test_a_settled_file_page_stands_still_and_lists_a_bounded_table(control_room,
                                                                          monkeypatch):
    """A file checked and analysed changes no more: its page does not reload itself (a page of
    a large file reloading every 5 s kept the page thread busy). Its table lists the first
    objects only and says where all of them are."""
    from dqm_daemon.handlers import pages

    client, files = control_room
    name = files["emc_start"]["filename"]
    twin = await (await client.get(f"/files/{name}.json")).json()
    assert twin["settled"] is True and twin["object_count"] == 7
    monkeypatch.setattr(pages, "MAX_PAGE_OBJECTS", 3)
    html = await (await client.get(f"/files/{name}")).text()
    assert 'http-equiv="refresh"' not in html and "refreshes every" not in html
    assert "Objects (7)" in html and "The first 3 are listed here" in html
    assert f'href="/rest/api/files/{name}/info"' in html
    assert len((await (await client.get(f"/files/{name}.json")).json())["file"]["objects"]) == 3
    status = await (await client.get("/status")).text()
    assert '<meta http-equiv="refresh" content="5">' in status  # the status page still does


async def test_quarantined_file_page_shows_reason(control_room):
    """A quarantined file's page says it is invalid, why, and offers no download."""
    client, files = control_room
    name = files["trd_bad"]["filename"]
    html = await (await client.get(f"/files/{name}")).text()
    assert "✖ INVALID" in html
    assert "not a ROOT file" in html and "quarantine" in html
    assert "download" not in html


async def test_run_page(control_room):
    """A run's page lists its files by agent and time, and who started and ended it."""
    client, files = control_room
    twin = await (await client.get("/runs/100.json")).json()
    assert [(row["agent"], row["timestamp"] - RUN_START) for row in twin["files"]] == [
        ("EMC", 0), ("EMC", 60), ("TPC", 0), ("TPC", 120)]
    agents = {agent["agent"]: agent for agent in twin["agents"]}
    assert agents["TPC"]["ended_at"] and not agents["EMC"]["ended_at"]
    html = await (await client.get("/runs/100")).text()
    assert files["tpc_end"]["filename"] in html and "Run 100" in html


async def test_file_counts_say_that_they_include_invalid_files(control_room):
    """TRD's one file of run 101 is invalid: it counts among the files received, and the
    columns that count it say so."""
    client, _ = control_room
    twin = await (await client.get("/runs/101.json")).json()
    assert {agent["agent"]: agent["files"] for agent in twin["agents"]}["TRD"] == 1
    included = 'title="files received, invalid (quarantined) ones included">files</th>'
    assert included in await (await client.get("/runs/101")).text()
    assert (await (await client.get("/status")).text()).count(included) == 2  # agents, runs


@pytest.mark.parametrize(("previews", "status"), [("x", 400), ("1_0", 400), ("-1", 400),
                                                  ("\uff12", 400), ("1000", 200), ("0", 200)])
async def test_the_previews_parameter(control_room, previews, status):
    """`previews` takes ASCII digits only (int() also reads '1_0' and other scripts' digits);
    more than 200 asks for 200."""
    client, files = control_room
    response = await client.get(f"/files/{files['emc_start']['filename']}.json",
                                params={"previews": previews})
    assert response.status == status
    if status == 400:
        assert "previews" in (await response.json())["message"]


@pytest.mark.parametrize("path", ["/files/nothing.root", "/files/nothing.root.json",
                                  "/runs/999", "/runs/999.json"])
async def test_unknown_pages_are_404(client, path):
    """Unknown files and runs are a JSON 404."""
    response = await client.get(path)
    assert response.status == 404
    assert "message" in await response.json()


async def test_pages_can_require_basic_auth(aiohttp_client, data_dir, one_histogram_file):
    """With pages_basic_auth set, pages ask for a password; /healthz and the API do not."""
    client = await aiohttp_client(create_app(make_settings(data_dir,
                                                           pages_basic_auth="shift:crew-pass")))
    response = await client.get("/status")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    wrong = base64.b64encode(b"shift:nope").decode()
    assert (await client.get("/status", headers={"Authorization": f"Basic {wrong}"})).status == 401
    right = base64.b64encode(b"shift:crew-pass").decode()
    assert (await client.get("/status.json",
                             headers={"Authorization": f"Basic {right}"})).status == 200
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/rest/api/files", headers={"token": TOKEN})).status == 200


async def test_inspection_child_that_cannot_start_is_an_error(aiohttp_client, data_dir,
                                                              one_histogram_file):
    """If the inspection child cannot start, the banner turns ERROR and says so; the upload is
    still acknowledged and kept pending."""
    settings = make_settings(data_dir, inspection_workers=1, inspection_budget_seconds=0.5)
    client = await aiohttp_client(create_app(settings, inspection_command=("/bin/false",)))
    response = await client.post("/rest/api/files", data=one_histogram_file,
                                 headers={"token": TOKEN, "runNumber": "1", "timeStamp": "2"})
    assert response.status == 202
    for _ in range(100):
        status = await (await client.get("/status.json")).json()
        if status["level"] == "ERROR":
            break
        await asyncio.sleep(0.05)
    assert status["level"] == "ERROR"
    assert any(reason.startswith("inspection child cannot start") for reason in status["reasons"])
    assert status["inspection"]["pending_files"] == 1


async def test_a_failed_analysis_is_shown_to_the_crew(client, tmp_path):
    """A sound file whose histogram does not decompress: the file page says the analysis
    failed and why, the status page flags it, and the file stays listed and downloadable."""
    from .test_inspection import _corrupt_compressed_payload
    from .test_pipeline import analysed, upload

    content = _corrupt_compressed_payload(write_one_histogram_file(tmp_path / "s.root").read_bytes())
    response, body = await upload(client, content)
    assert response.status == 200, body
    details = await analysed(client, body["filename"])
    assert details["analysis"] == "failed" and "does not decompress" in details["analysis_reason"]
    page = await (await client.get(f"/files/{body['filename']}")).text()
    assert "ANALYSIS FAILED" in page and "does not decompress" in page
    status = await (await client.get("/status")).text()
    assert "analysis failed" in status
    listing = await (await client.get("/rest/api/files", headers={"token": TOKEN})).json()
    assert body["filename"] in listing["files"]


async def test_names_and_titles_that_are_not_utf8_are_shown_not_a_500(client, tmp_path):
    """Old macros write Latin-1 ('µ' as the byte 0xB5) into names and titles: the file's page,
    its JSON twin (strict JSON) and the previews show them with a replacement character."""
    import json

    from .test_pipeline import analysed, upload

    path = tmp_path / "latin1.root"
    with uproot.recreate(path, compression=None) as root_file:
        root_file["hQQ"] = th1f("hQQ", "time (QQs)", [1.0, 2.0, 3.0])
    content = path.read_bytes().replace(b"QQ", b"\xb5\xb5")  # same length: offsets hold
    response, body = await upload(client, content)
    assert response.status == 200, body
    details = await analysed(client, body["filename"])
    assert details["analysis"] == "done", details
    page = await client.get(f"/files/{body['filename']}")
    assert page.status == 200, await page.text()
    assert "time (\ufffd\ufffds)" in await page.text()
    twin = await client.get(f"/files/{body['filename']}.json")
    assert twin.status == 200
    data = json.loads((await twin.read()).decode("utf-8"))  # UTF-8 throughout, no lone surrogate
    name = "h\ufffd\ufffd"
    assert [entry["path"] for entry in data["file"]["objects"]] == [name]
    assert data["previews"][name]["values"] == [1.0, 2.0, 3.0]
    # A row analysed by an older version holds the names as lone surrogates (JSON escapes):
    # its page and twin still answer.
    import sqlite3

    with sqlite3.connect(client.server.app[SETTINGS].catalog_path) as catalog:
        for stored in (json.dumps(name)[1:-1], name):  # escaped or not, as it was written
            catalog.execute("UPDATE files SET objects_json = replace(objects_json, ?, ?)",
                            (stored, "h\\udcb5\\udcb5"))
        (listing,) = catalog.execute("SELECT objects_json FROM files").fetchone()
        assert "h\\udcb5" in listing
    for path in (f"/files/{body['filename']}", f"/files/{body['filename']}.json"):
        answer = await client.get(path)
        assert answer.status == 200, (path, await answer.text())


def _th1(name: str, counts: list[float], low: float = 0.0, high: float = 1.0,
         entries: float = 4.0):
    from uproot.writing.identify import to_TAxis, to_TH1x

    values = np.asarray([0.0, *counts, 0.0])
    return to_TH1x(name, name, values, fEntries=entries, fTsumw=1.0, fTsumw2=1.0, fTsumwx=0.5,
                   fTsumwx2=0.5, fSumw2=np.zeros(len(values)),
                   fXaxis=to_TAxis("xaxis", "x", len(counts), low, high))


def _th2(name: str, counts: np.ndarray):
    from uproot.writing.identify import to_TAxis, to_TH2x

    values = np.zeros((counts.shape[0] + 2, counts.shape[1] + 2))
    values[1:-1, 1:-1] = counts
    return to_TH2x(name, name, values.T.reshape(-1), fEntries=1.0, fTsumw=1.0, fTsumw2=1.0,
                   fTsumwx=0.5, fTsumwx2=0.5, fTsumwy=0.5, fTsumwy2=0.5, fTsumwxy=0.1,
                   fSumw2=np.zeros(values.size),
                   fXaxis=to_TAxis("xaxis", "x", counts.shape[0], 0.0, 1.0),
                   fYaxis=to_TAxis("yaxis", "y", counts.shape[1], 0.0, 1.0))


async def test_hostile_numbers_in_histograms_do_not_break_the_file_page(client, tmp_path):
    """Infinite bins in 1D and 2D histograms, an axis starting at NaN, a bin at 1e308, infinite
    entries: the file page still answers, draws what can be drawn with finite coordinates only,
    says which histogram cannot be drawn, and shows unknown entries as unknown, not 0."""
    from .test_pipeline import analysed, upload

    corners = np.ones((6, 6))
    corners[2, 2], corners[3, 3] = np.inf, -np.inf
    path = tmp_path / "hostile.root"
    with uproot.recreate(path) as root_file:
        root_file["inf1d"] = _th1("inf1d", [1.0, np.inf, 3.0, -np.inf])
        root_file["huge"] = _th1("huge", [1.0, 1e308, -1e308, 2.0])
        root_file["inf2d"] = _th2("inf2d", corners)
        root_file["nanaxis"] = _th1("nanaxis", [1.0, 2.0, 3.0], low=float("nan"))
        root_file["infentries"] = _th1("infentries", [1.0, 2.0], entries=float("inf"))
    response, body = await upload(client, path.read_bytes())
    assert response.status == 200, body
    await analysed(client, body["filename"])
    page = await client.get(f"/files/{body['filename']}")
    text = await page.text()
    assert page.status == 200
    svgs = re.findall(r"<svg.*?</svg>", text, flags=re.S)
    assert len(svgs) == 4  # inf1d, huge, inf2d, infentries
    drawn = " ".join(svgs)
    coordinates = re.findall(r'\b(?:x|y|x1|y1|x2|y2|width|height|points)="([^"]*)"', drawn)
    assert coordinates and all(re.fullmatch(r"[-0-9., ]+", value) for value in coordinates)
    assert not re.search(r">[^<]*\b(nan|inf)\b", drawn)  # nor a tick label
    assert "nothing to draw" in text  # the NaN axis, named
    infinite_row = re.search(r"<tr>(?:(?!</tr>).)*?>infentries<.*?</tr>", text, flags=re.S)
    assert infinite_row and '<td class="num">—</td>' in infinite_row.group(0)
    twin = await (await client.get(f"/files/{body['filename']}.json")).json()
    assert set(twin["previews"]) == {"inf1d", "huge", "inf2d", "nanaxis", "infentries"}


async def test_preview_cache_keeps_what_it_counts(tmp_path, monkeypatch):
    """Page views at the same moment read the same previews twice; the cache counts them once,
    so it keeps the latest files' previews (here: they still show after the files are gone,
    read from memory) rather than drifting until it holds nothing."""
    from dqm_daemon import previewer
    from dqm_daemon.catalog import IN_DATA_DIR
    from dqm_daemon.ingest import new_record
    from dqm_daemon.inspection_pool import InspectorProcess
    from dqm_daemon.naming import DQMHeaders
    from dqm_daemon.storage import Storage

    from .rootfiles import th1f

    # Room for three files' previews (3 x 100 values each), not four.
    one_file = 3 * previewer._estimated_bytes({"values": [0.0] * 100, "title": "h0",
                                               "axes": [{"title": ""}], "dimensions": 1})
    monkeypatch.setattr(previewer, "CACHED_BYTES", 3 * one_file + one_file // 2)
    storage = Storage(make_settings(tmp_path / "data"))
    storage.prepare()
    paths = ["h0", "h1", "h2"]
    records = []
    for number in range(8):
        name = f"file{number}.root"
        with uproot.recreate(storage.path_of(name, IN_DATA_DIR)) as root_file:
            for path in paths:
                root_file[path] = th1f(path, path, [number] * 100)
        records.append(new_record(name, 1, f"sha{number}", DQMHeaders(number, 1, "EMC", 0), "u"))
    cache = previewer.Previewer(InspectorProcess(1 << 31, 20.0), storage)
    try:
        for record in records:  # two views of each file's page at once: both read it
            first, second = await asyncio.gather(cache.previews(record, paths),
                                                 cache.previews(record, paths))
            assert first == second and all("values" in first[path] for path in paths)
        for record in records:
            storage.path_of(record.name, record.location).unlink()
        for record in records[-3:]:
            shown = await cache.previews(record, paths)
            assert all(shown[path]["values"][0] == int(record.name[4]) for path in paths)
    finally:
        await cache.close()


async def test_previews_that_cannot_be_read_now_are_said_and_read_again_later(tmp_path,
                                                                               monkeypatch):
    """The preview child cannot start (a full process table, an upgrade under way), or the
    file cannot be read this time: the page's previews say why, nothing fails, and the next
    view reads them again rather than showing the old failure for as long as the daemon runs."""
    from dqm_daemon import previewer
    from dqm_daemon.catalog import IN_DATA_DIR
    from dqm_daemon.ingest import new_record
    from dqm_daemon.inspection_pool import InspectorProcess
    from dqm_daemon.naming import DQMHeaders
    from dqm_daemon.storage import Storage

    from .rootfiles import th1f

    storage = Storage(make_settings(tmp_path / "data"))
    storage.prepare()
    record = new_record("file.root", 1, "sha", DQMHeaders(1, 1, "EMC", 0), "u")
    unstartable = previewer.Previewer(InspectorProcess(1 << 31, 20.0, ("/bin/false",)), storage)
    cache = previewer.Previewer(InspectorProcess(1 << 31, 20.0), storage)
    try:
        shown = await unstartable.previews(record, ["h"])
        assert "inspection child" in shown["h"]["error"]
        shown = await cache.previews(record, ["h"])  # the file is not there yet
        assert "error" in shown["h"]
        with uproot.recreate(storage.path_of(record.name, IN_DATA_DIR)) as root_file:
            root_file["h"] = th1f("h", "h", [1.0, 2.0])
        # Said again for a while without a read (a file that times out would hold the child
        # at every view), then read again.
        assert "error" in (await cache.previews(record, ["h"]))["h"]
        monkeypatch.setattr(previewer, "FAILED_READ_SECONDS", 0.0)
        for key, (failure, _) in list(cache._failed.items()):
            cache._failed[key] = (failure, 0.0)
        shown = await cache.previews(record, ["h"])
        assert shown["h"]["values"] == [1.0, 2.0]
    finally:
        await unstartable.close()
        await cache.close()


async def test_a_long_runs_page_shows_its_latest_files_of_every_agent(client, tmp_path,
                                                                        monkeypatch):
    """A run with more files than its page lists shows the latest ones, by agent and time
    (not the alphabetically first agents' all), and says so only when files are left out."""
    from dqm_daemon.handlers import pages

    from .test_pipeline import upload

    content = write_one_histogram_file(tmp_path / "h.root").read_bytes()
    names = []
    for agent, timestamp in (("AAA", 1000), ("AAA", 1100), ("ZZZ", 1200), ("ZZZ", 1300)):
        response, body = await upload(client, content, agent=agent, run=77, timestamp=timestamp)
        assert response.status == 200, body
        names.append(body["filename"])
    monkeypatch.setattr(pages, "MAX_RUN_FILES", 4)
    twin = await (await client.get("/runs/77.json")).json()
    assert [row["name"] for row in twin["files"]] == names and twin["files_truncated"] is False
    monkeypatch.setattr(pages, "MAX_RUN_FILES", 3)
    twin = await (await client.get("/runs/77.json")).json()
    assert [row["name"] for row in twin["files"]] == names[1:] and twin["files_truncated"]
    assert "(the latest 3)" in await (await client.get("/runs/77")).text()


async def test_bins_of_different_widths_are_drawn_where_they_lie(client, tmp_path):
    """A histogram binned [0, 1, 10, 100] (as for energies): each bin is drawn over its own
    range of the axis, not spread evenly; evenly binned ones carry no edges."""
    from dqm_daemon import svg

    from .test_pipeline import analysed, upload

    path = tmp_path / "variable.root"
    with uproot.recreate(path) as root_file:
        root_file["energy"] = np.histogram([0.5, 5.0, 5.0, 50.0], bins=[0.0, 1.0, 10.0, 100.0])
        root_file["even"] = np.histogram([0.5, 5.0], bins=4, range=(0.0, 8.0))
        root_file["map"] = np.histogram2d([0.5, 3.0], [0.5, 50.0], bins=[[0.0, 1.0, 4.0],
                                                                         [0.0, 10.0, 100.0]])
    response, body = await upload(client, path.read_bytes())
    assert response.status == 200, body
    await analysed(client, body["filename"])
    previews = (await (await client.get(f"/files/{body['filename']}.json")).json())["previews"]
    assert previews["energy"]["axes"][0]["edges"] == [0.0, 1.0, 10.0, 100.0]
    assert previews["energy"]["values"] == [1.0, 2.0, 1.0]
    assert "edges" not in previews["even"]["axes"][0]
    assert [axis["edges"] for axis in previews["map"]["axes"]] == [[0.0, 1.0, 4.0],
                                                                  [0.0, 10.0, 100.0]]
    drawn = str(svg.draw(previews["energy"]))
    points = re.search(r'class="step" points="([^"]*)"', drawn).group(1).split()
    xs = sorted({float(point.split(",")[0]) for point in points})
    plot_x = [round((x - svg.LEFT) / svg.PLOT_WIDTH, 2) for x in xs]
    assert plot_x == [0.0, 0.01, 0.1, 1.0]  # the bin edges, in axis units over 0–100
    page = await (await client.get(f"/files/{body['filename']}")).text()
    assert page.count("<svg") == 3
    # 301 edges of 300 bins, merged three by three to 100 shown: their edges are kept.
    from dqm_daemon.previews import _variable_edges

    shown = _variable_edges(np.geomspace(1.0, 1000.0, 301), 300, 100)
    assert len(shown) == 101 and (shown[0], shown[-1]) == (1.0, 1000.0)
    assert all(low < high for low, high in itertools.pairwise(shown))


async def test_a_file_page_lists_the_first_objects_and_counts_them_all(client, tmp_path,
                                                                        monkeypatch):
    """A file of more objects than its page lists: the page lists the first ones, counts them
    all, draws the first histograms (a tree among them is not one), and the info resource
    gives every object."""
    from dqm_daemon.handlers import pages

    from .rootfiles import th1f
    from .test_pipeline import analysed, info, upload

    path = tmp_path / "many.root"
    with uproot.recreate(path) as root_file:
        root_file["a"] = th1f("a", "a", [1.0])
        root_file["tree"] = {"x": np.arange(3.0)}
        for name in ("b", "c", "d"):
            root_file[name] = th1f(name, name, [2.0, 3.0])
    response, body = await upload(client, path.read_bytes())
    assert response.status == 200, body
    await analysed(client, body["filename"])
    monkeypatch.setattr(pages, "MAX_PAGE_OBJECTS", 3)
    twin = await (await client.get(f"/files/{body['filename']}.json?previews=2")).json()
    assert [entry["path"] for entry in twin["file"]["objects"]] == ["a", "tree", "b"]
    assert (twin["object_count"], twin["histograms"]) == (5, 4)
    assert list(twin["previews"]) == ["a", "b"]
    page = await (await client.get(f"/files/{body['filename']}")).text()
    assert "The first 3 are listed here" in page
    details = await info(client, body["filename"])
    assert [entry["path"] for entry in details["objects"]] == ["a", "tree", "b", "c", "d"]
    assert details["name"] == body["filename"] and details["analysis"] == "done"
