"""What the check and the analysis find in a file, against what the file was written to hold."""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import uproot

from dqm_daemon import inspection, root_structure
from dqm_daemon.findings import compare_with_previous
from dqm_daemon.inspection import analyse_file, inspect_file

from . import hostile
from .rootfiles import histogram, profile, th1f, write_one_histogram_file

RNG = np.random.default_rng(2026)
X = RNG.normal(0.5, 0.2, 2000)
Y = RNG.normal(0.4, 0.1, 2000)
Z = RNG.random(2000)


def by_path(result: dict) -> dict[str, dict]:
    return {entry["path"]: entry for entry in result["objects"]}


@pytest.fixture(scope="module")
def every_class_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("root") / "classes.root"
    with uproot.recreate(path) as root_file:
        root_file["h1f"] = histogram("h1f", "float 1D", [X], dtype=np.float32)
        root_file["h1d"] = histogram("h1d", "double 1D", [X], dtype=np.float64)
        root_file["h1i"] = histogram("h1i", "int 1D", [X], dtype=np.int32)
        root_file["h1s"] = histogram("h1s", "short 1D", [X], dtype=np.int16)
        root_file["h1c"] = histogram("h1c", "char 1D", [X[:100]], dtype=np.int8)
        root_file["maps/h2f"] = histogram("h2f", "float 2D", [X, Y], dtype=np.float32)
        root_file["maps/h2d"] = histogram("h2d", "double 2D", [X, Y])
        root_file["maps/deeper/h3d"] = histogram("h3d", "double 3D", [X, Y, Z], bins=8)
        root_file["maps/deeper/h3f"] = histogram("h3f", "float 3D", [X, Y, Z], bins=8,
                                                 dtype=np.float32)
        root_file["prof"] = profile("prof", "profile", [X], Y)
        root_file["prof2d"] = profile("prof2d", "profile 2D", [X, Y], Z)
        root_file["empty"] = histogram("empty", "nothing yet", [np.array([])])
        root_file["summary"] = uproot.writing.identify.to_TList(
            [th1f("rate", "rate", [1, 2]), histogram("width", "width", [X, Y])], name="summary")
        tree = root_file.mktree("events", {"energy": np.float64, "hits": np.int32},
                                title="the events")
        tree.extend({"energy": Z[:500], "hits": np.arange(500, dtype=np.int32)})
    return path


def test_every_histogram_class_is_summarised(every_class_file):
    """Each histogram class reports entries, bins, mean, std and flow as written."""
    result = analyse_file(every_class_file)
    assert result["state"] == "ok", result
    objects = by_path(result)
    assert {path: entry["class"] for path, entry in objects.items()} == {
        "h1f": "TH1F", "h1d": "TH1D", "h1i": "TH1I", "h1s": "TH1S", "h1c": "TH1C",
        "maps": "TDirectory", "maps/h2f": "TH2F", "maps/h2d": "TH2D",
        "maps/deeper": "TDirectory", "maps/deeper/h3d": "TH3D", "maps/deeper/h3f": "TH3F",
        "prof": "TProfile", "prof2d": "TProfile2D", "empty": "TH1D", "events": "TTree",
        "summary": "TList",
    }
    inside_x = (X >= 0) & (X < 1)
    h1 = objects["h1d"]
    assert h1["title"] == "double 1D"
    assert (h1["entries"], h1["dimensions"], h1["empty"]) == (2000, 1, False)
    (x_axis,) = h1["axes"]
    assert (x_axis["bins"], x_axis["low"], x_axis["high"]) == (20, 0.0, 1.0)
    assert x_axis["mean"] == pytest.approx(X[inside_x].mean())
    assert x_axis["std"] == pytest.approx(X[inside_x].std())
    assert x_axis["underflow"] == (X < 0).sum()
    assert x_axis["overflow"] == (X >= 1).sum()
    assert h1["sum_of_weights"] == inside_x.sum()
    inside_xy = inside_x & (Y >= 0) & (Y < 1)
    h2 = objects["maps/h2f"]
    assert h2["dimensions"] == 2
    assert [axis["bins"] for axis in h2["axes"]] == [20, 20]
    assert h2["axes"][1]["mean"] == pytest.approx(Y[inside_xy].mean(), rel=1e-6)
    assert h2["axes"][0]["underflow"] == (X < 0).sum()
    h3 = objects["maps/deeper/h3d"]
    assert (h3["dimensions"], [axis["bins"] for axis in h3["axes"]]) == (3, [8, 8, 8])
    assert h3["integral"] == 2000
    prof = objects["prof"]
    assert prof["dimensions"] == 1
    assert prof["axes"][0]["overflow"] == (X >= 1).sum()
    assert objects["prof2d"]["dimensions"] == 2


def test_empty_histogram_and_tree(every_class_file):
    """An empty histogram is flagged empty; a tree reports entries and branches."""
    objects = by_path(analyse_file(every_class_file))
    assert objects["empty"]["empty"] is True
    assert objects["empty"]["axes"][0]["mean"] is None
    assert objects["events"] == {"path": "events", "class": "TTree", "title": "the events",
                                 "interpreted": True, "entries": 500, "branches": 2}
    assert objects["maps"]["class"] == "TDirectory"


def test_received_lists_top_level_objects(every_class_file):
    """The compatibility map lists top-level keys as the old receiver did, directories too."""
    received = inspect_file(every_class_file)["received"]
    assert received["h1f"] == "Obj name: h1f, Obj IsA() Name: TH1F"
    # ROOT reads a directory's key (class TDirectory) as a TDirectoryFile: the receiver said so.
    assert received["maps"] == "Obj name: maps, Obj IsA() Name: TDirectoryFile"
    assert "maps/h2f" not in received
    assert len(received) == 11


def test_only_the_highest_cycle_is_listed(tmp_path):
    """A key written twice is listed once, as its latest cycle."""
    path = tmp_path / "cycles.root"
    with uproot.recreate(path) as root_file:
        root_file["h"] = th1f("h", "first", [1, 2])
        root_file["h"] = th1f("h", "second", [1, 2, 3, 4])
    (listed,) = inspect_file(path)["objects"]
    (analysed,) = analyse_file(path)["objects"]
    assert listed == {"path": "h", "class": "TH1F", "title": "second"}
    assert (analysed["title"], analysed["entries"]) == ("second", 10)


def test_shared_real_files(shared_root_files):
    """Every real file written by ROOT checks as sound, listing exactly the keys uproot sees
    (paths, classes and order), and its analysis reads every one."""
    for path in shared_root_files:
        result = inspect_file(path)
        assert result["state"] == "ok", (path.name, result)
        with uproot.open(path) as root_file:
            expected = root_file.classnames(recursive=True, cycle=False)
        listed = [(entry["path"], entry["class"]) for entry in result["objects"]]
        assert listed == list(expected.items()), path.name
        assert set(result["received"]) == {key for key in expected if "/" not in key}
        analysed = analyse_file(path)
        assert analysed["state"] == "ok", (path.name, analysed)
        assert [entry["path"] for entry in analysed["objects"]] == list(expected), path.name


def test_uninterpretable_class_is_listed_not_invalid(shared_root_files):
    """A class uproot cannot read (TEfficiency here) is listed by name, not interpreted."""
    (path,) = [path for path in shared_root_files if path.name == "uproot-issue209.root"]
    result = analyse_file(path)
    assert result["state"] == "ok"
    (entry,) = result["objects"]
    assert (entry["class"], entry["interpreted"]) == ("TEfficiency", False)


def test_lists_report_their_members(every_class_file):
    """A TList names its members and their classes."""
    assert by_path(analyse_file(every_class_file))["summary"]["members"] == [
        {"name": "rate", "class": "TH1F"}, {"name": "width", "class": "TH2D"}]


def test_ntuple_from_root_reports_branches(shared_root_files):
    """A TNtuple written by ROOT reports its entries and branches."""
    (path,) = [p for p in shared_root_files if p.name == "uproot-hepdata-example.root"]
    assert by_path(analyse_file(path))["ntuple"]["entries"] == 75000
    assert by_path(analyse_file(path))["ntuple"]["branches"] == 5


@pytest.mark.parametrize("kind", ["truncated", "garbled", "empty", "text", "header_only",
                                  "bad_block_sizes"])
def test_unsound_files_are_invalid_with_a_reason(tmp_path, kind):
    """Truncated, garbled, empty, text and header-only files are invalid, with a short reason."""
    sound = write_one_histogram_file(tmp_path / "sound.root").read_bytes()
    if kind == "bad_block_sizes":
        content = _misframe_compressed_block(sound)
    else:
        content = {
            "truncated": sound[: len(sound) - 500],
            "garbled": sound[:100] + bytes(RNG.integers(0, 256, len(sound) - 100,
                                                        dtype=np.uint8)),
            "empty": b"",
            "text": b"root of all evil, said the text file\n" * 20,
            "header_only": sound[:64],
        }[kind]
    path = tmp_path / f"{kind}.root"
    path.write_bytes(content)
    result = inspect_file(path)
    assert result["state"] == "invalid", result
    assert result["reason"] and len(result["reason"]) < 300
    assert str(tmp_path) not in result["reason"]
    assert "objects" not in result


def _misframe_compressed_block(sound: bytes) -> bytes:
    """Make the histogram's compressed block claim one byte more than it holds."""
    start = sound.index(b"ZL")  # ROOT's compression block header
    corrupted = bytearray(sound)
    compressed = int.from_bytes(corrupted[start + 3:start + 6], "little")
    corrupted[start + 3:start + 6] = (compressed + 1).to_bytes(3, "little")
    return bytes(corrupted)


def test_a_payload_that_does_not_decompress_fails_the_analysis(tmp_path):
    """Bytes flipped inside a zlib stream, every header intact: the check (which does not
    inflate) finds the file sound; the analysis says which object does not decompress."""
    path = tmp_path / "flipped.root"
    path.write_bytes(_corrupt_compressed_payload(
        write_one_histogram_file(tmp_path / "sound.root").read_bytes()))
    assert inspect_file(path)["state"] == "ok"
    analysed = analyse_file(path)
    assert analysed["state"] == "failed"
    assert "does not decompress" in analysed["reason"], analysed


def _corrupt_compressed_payload(sound: bytes) -> bytes:
    """Flip bytes inside the histogram's zlib stream, leaving every header intact."""
    start = sound.index(b"ZL")  # ROOT's compression block header
    corrupted = bytearray(sound)
    for offset in range(start + 12, start + 40):
        corrupted[offset] ^= 0x5A
    return bytes(corrupted)


def test_findings_against_previous_file():
    """Disappeared and new objects, emptied histograms and entries going back are found."""
    before = [{"path": "a", "entries": 10, "empty": False},
              {"path": "b", "entries": 5, "empty": False},
              {"path": "gone", "entries": 1, "empty": False}]
    after = [{"path": "a", "entries": 0, "empty": True},
             {"path": "b", "entries": 7, "empty": False},
             {"path": "new", "entries": 3, "empty": False}]
    findings = {f["kind"]: f for f in compare_with_previous("prev.root", before, after)}
    assert findings["objects_disappeared"]["objects"] == ["gone"]
    assert findings["objects_appeared"]["objects"] == ["new"]
    assert findings["histograms_became_empty"]["objects"] == ["a"]
    assert findings["entries_went_backwards"]["entries"] == {"a": [10, 0]}
    assert all(f["previous_file"] == "prev.root" for f in findings.values())
    assert compare_with_previous("prev.root", after, after) == []


def test_a_class_change_is_a_finding_and_its_contents_are_not_compared():
    """An object whose class changed (a histogram replaced by a tree) is reported as such, and
    its entries are not compared across classes."""
    before = [{"path": "occ", "class": "TH1F", "entries": 5000, "empty": False},
              {"path": "hits", "class": "TH1F", "entries": 9, "empty": False}]
    after = [{"path": "occ", "class": "TTree", "entries": 12},
             {"path": "hits", "class": "TH1D", "entries": 3, "empty": False}]
    findings = {f["kind"]: f for f in compare_with_previous("prev.root", before, after)}
    assert findings["class_changed"]["classes"] == {"occ": ["TH1F", "TTree"],
                                                    "hits": ["TH1F", "TH1D"]}
    # A 1D histogram stays one when its bins change type: its entries are compared.
    assert findings["entries_went_backwards"]["entries"] == {"hits": [9, 3]}


def test_zlib_marker_helper_is_real(tmp_path):
    """The corruption helper really targets a zlib stream (guards the test above)."""
    sound = write_one_histogram_file(tmp_path / "s.root").read_bytes()
    start = sound.index(b"ZL")
    zlib.decompressobj().decompress(sound[start + 9:start + 200])


@pytest.mark.parametrize("compression", [uproot.ZLIB(4), uproot.LZMA(4), uproot.LZ4(4),
                                         uproot.ZSTD(4), None], ids=str)
def test_every_compression_algorithm(tmp_path, compression):
    """Files compressed with zlib, lzma, lz4 or zstd (or not at all) check as sound and
    analyse."""
    path = tmp_path / "compressed.root"
    with uproot.recreate(path, compression=compression) as root_file:
        root_file["h"] = th1f("h", "h", list(range(500)))
        root_file["d/h2"] = histogram("h2", "h2", [X, Y])
    checked = inspect_file(path)
    assert checked["state"] == "ok", checked
    result = analyse_file(path)
    assert result["state"] == "ok", result
    assert by_path(result)["h"]["entries"] == sum(range(500))
    assert by_path(result)["d/h2"]["entries"] == len(X)


def _put_int32(content: bytearray, offset: int, value: int) -> None:
    content[offset:offset + 4] = value.to_bytes(4, "big", signed=True)


def test_a_key_list_that_lies_about_its_count_is_invalid(tmp_path):
    """A directory claiming a million keys in a file of a few KiB fails its check."""
    path = write_one_histogram_file(tmp_path / "sound.root")
    with uproot.open(path) as root_file:
        seek_keys = root_file.fSeekKeys
    content = bytearray(path.read_bytes())
    key_len = int.from_bytes(content[seek_keys + 14:seek_keys + 16], "big")
    _put_int32(content, seek_keys + key_len, 1_000_000)
    path.write_bytes(bytes(content))
    result = inspect_file(path)
    assert result["state"] == "invalid"
    assert "declares 1000000 keys" in result["reason"]


def test_a_directory_that_contains_itself_is_invalid(tmp_path):
    """A subdirectory whose key list is its parent's would make a walk loop forever."""
    path = tmp_path / "loop.root"
    with uproot.recreate(path) as root_file:
        root_file["d/h"] = th1f("h", "h", [1, 2])
    with uproot.open(path) as root_file:
        top_seek_keys = root_file.fSeekKeys
        key = root_file.key("d")
        record = key.data_cursor.index  # the directory record, after the key header
    content = bytearray(path.read_bytes())
    assert int.from_bytes(content[record:record + 2], "big") <= 1000  # 32-bit seeks
    _put_int32(content, record + 18 + 8, top_seek_keys)  # fSeekDir, fSeekParent, fSeekKeys
    path.write_bytes(bytes(content))
    result = inspect_file(path)
    assert result["state"] == "invalid"
    assert "contains itself" in result["reason"]


def _top_directory_record(content: bytes) -> int:
    """Where the top directory's record starts: after the file's own key and name at fBEGIN
    (a small file: 32-bit fields)."""
    begin, nbytes_name = (int.from_bytes(content[8:12], "big"),
                          int.from_bytes(content[28:32], "big"))
    return begin + nbytes_name


def test_a_key_list_read_otherwise_than_uproot_reads_it_is_invalid(tmp_path):
    """ROOT and uproot read fNbytesKeys bytes of a directory's key list and step over each key
    header's strings: a list whose own length disagrees with its directory's, or a key whose
    strings disagree with its declared header length (one flipped bit each), is unreadable to
    them, so the check refuses it too (it passed such files, and only the analysis failed)."""
    sound = write_one_histogram_file(tmp_path / "sound.root").read_bytes()
    with uproot.open(tmp_path / "sound.root") as root_file:
        seek_keys = root_file.fSeekKeys
    short_list = bytearray(sound)
    _put_int32(short_list, _top_directory_record(sound) + 10, 20)  # fNbytesKeys
    long_title = bytearray(sound)
    class_length = sound[seek_keys + 26]  # the list's own key header: its class name...
    name_length = sound[seek_keys + 27 + class_length]
    long_title[seek_keys + 28 + class_length + name_length] ^= 0x01  # ...name, title length
    for name, content, reason in (("short.root", short_list, "its directory says 20"),
                                  ("title.root", long_title, "not the")):
        path = tmp_path / name
        path.write_bytes(bytes(content))
        with pytest.raises(Exception), uproot.open(path) as root_file:  # noqa: B017
            root_file.keys()  # uproot cannot read it (its error class does not matter)
        result = inspect_file(path)
        assert result["state"] == "invalid" and reason in result["reason"], result


def test_the_key_checked_is_the_key_read(tmp_path):
    """A key's cycle turned negative by one bit: uproot takes the highest |cycle| as the newest,
    so the check must take that key too, and check its payload (here: past the end)."""
    path = tmp_path / "cycles.root"
    with uproot.recreate(path) as root_file:
        root_file["h"] = th1f("h", "first", [1, 2])
        root_file["h"] = th1f("h", "second", [3, 4])
    with uproot.open(path) as root_file:
        first = min((key.fCycle, key.cursor.index) for key in root_file._keys)[1]
    content = bytearray(path.read_bytes())
    content[first + 16] ^= 0x80  # fCycle 1 becomes -32767
    _put_int32(content, first + 18, 0x7FFFF000)  # its fSeekKey, far past the end
    path.write_bytes(bytes(content))
    result = inspect_file(path)
    assert result["state"] == "invalid" and "past the end of the file" in result["reason"]


def test_keys_past_the_listing_limit_are_still_checked(tmp_path, monkeypatch):
    """A file of more objects than are listed: the listing stops at the limit, the check does
    not (a broken key after the limit made a file valid that uproot cannot read)."""
    monkeypatch.setattr(inspection, "MAX_LISTED_OBJECTS", 3)
    path = tmp_path / "many.root"
    with uproot.recreate(path) as root_file:
        for index in range(5):
            root_file[f"h{index}"] = th1f(f"h{index}", "h", [index, 1])
    listed = inspect_file(path)
    assert listed["state"] == "ok" and len(listed["objects"]) == 3, listed
    with uproot.open(path) as root_file:
        last = max(key.cursor.index for key in root_file._keys)
    content = bytearray(path.read_bytes())
    _put_int32(content, last + 18, 0x7FFFF000)  # the last key's fSeekKey: past the end
    path.write_bytes(bytes(content))
    result = inspect_file(path)
    assert result["state"] == "invalid" and "h4: its payload lies past the end" in result["reason"]


def _structure_or_reason(path: Path) -> object:
    try:
        structure = root_structure.read_structure(path, inspection.MAX_LISTED_OBJECTS,
                                                  inspection.MAX_LISTED_CHARS)
    except root_structure.StructureError as exc:
        return str(exc)
    return [(entry.path, entry.class_name, entry.title) for entry in structure.entries]


def test_read_whole_or_record_by_record_the_check_says_the_same(tmp_path, every_class_file,
                                                               monkeypatch):
    """Small files are read at once and large ones a record at a time: on sound files and on
    200 hostile mutations both ways list the same objects or give the same reason."""
    layout = hostile.layout_of(every_class_file)
    rng = random.Random(6)
    paths = [every_class_file]
    for index in range(200):
        _, content = hostile.mutate(layout, rng)
        paths.append(tmp_path / f"mutant-{index}.root")
        paths[-1].write_bytes(content)
    whole = [_structure_or_reason(path) for path in paths]
    monkeypatch.setattr(root_structure, "WHOLE_FILE_BYTES", 0)
    by_record = [_structure_or_reason(path) for path in paths]
    assert by_record == whole
    assert isinstance(whole[0], list) and len(whole[0]) > 10  # the sound file is listed
    reasons = [outcome for outcome in whole if isinstance(outcome, str)]
    assert len(reasons) > 50  # most mutants are refused, for a reason both ways agree on


def test_names_holding_slash_or_semicolon_and_long_member_names(tmp_path):
    """An object named with '/' or ';7' (read by a lookup as a path or a cycle) is analysed like
    any other, the rest of its file too; list members' names, megabytes once decompressed,
    are cut to a readable length."""
    path = tmp_path / "names.root"
    with uproot.recreate(path) as root_file:
        root_file["good"] = th1f("good", "good", [1, 2, 3])
        root_file["hAAAA"] = th1f("hAAAA", "slash", [1, 2, 3])
        root_file["hBBBB"] = th1f("hBBBB", "cycle", [1, 2, 3])
    content = path.read_bytes().replace(b"hAAAA", b"h/AAA").replace(b"hBBBB", b"hB;77")
    path.write_bytes(content)
    result = analyse_file(path)
    assert result["state"] == "ok", result
    found = by_path(result)
    assert set(found) == {"good", "h/AAA", "hB;77"}
    assert all(entry["interpreted"] and entry["entries"] == 6 for entry in found.values())
    # All three are top-level objects: the answer's `received` names them all.
    assert set(inspect_file(path)["received"]) == {"good", "h/AAA", "hB;77"}

    long_name = "m" * 100_000
    listed = tmp_path / "list.root"
    with uproot.recreate(listed) as root_file:
        root_file["members"] = uproot.writing.identify.to_TList(
            [th1f(long_name, "t", [1]) for _ in range(3)])
    (entry,) = analyse_file(listed)["objects"]
    assert entry["member_count"] == 3
    assert all(len(member["name"]) <= inspection.MAX_REASON_CHARS for member in entry["members"])


def test_previews_find_the_objects_the_listing_names(tmp_path):
    """Previews read each object the listing names, even one named 'good;1' beside 'good' or
    named with a '/', and refuse an axis whose span overflows (drawing it would give NaN)."""
    from uproot.writing.identify import to_TAxis, to_TH1x

    from dqm_daemon.page_format import preview_svg
    from dqm_daemon.previews import read_previews

    path = tmp_path / "names.root"
    values = np.array([0.0, 1.0, 1.0, 0.0])
    with uproot.recreate(path) as root_file:
        root_file["good"] = th1f("good", "good", [1, 2, 3])
        root_file["gXXXXX"] = th1f("gXXXXX", "cycle-like", [7, 7, 7, 7, 7])
        root_file["hAAAA"] = th1f("hAAAA", "slash", [4, 4])
        root_file["wide"] = to_TH1x(
            "wide", "wide", values, fEntries=2.0, fTsumw=2.0, fTsumw2=2.0, fTsumwx=0.0,
            fTsumwx2=0.0, fSumw2=values,
            fXaxis=to_TAxis("xaxis", "x", 2, -1e308, 1e308, fXbins=np.array([-1e308, 0, 1e308])))
    path.write_bytes(path.read_bytes().replace(b"gXXXXX", b"good;1").replace(b"hAAAA", b"h/AAA"))
    listed = [entry["path"] for entry in analyse_file(path)["objects"]]
    assert listed == ["good", "good;1", "h/AAA", "wide"]
    previews = read_previews(path, listed, 100)["previews"]
    assert previews["good"]["values"] == [1, 2, 3]
    assert previews["good;1"]["values"] == [7, 7, 7, 7, 7]
    assert previews["h/AAA"]["values"] == [4, 4]
    assert "nothing to draw" in previews["wide"]["error"]
    assert "nan" not in preview_svg(previews["good"])


def test_previews_carry_short_titles(tmp_path):
    """A histogram's titles come from the file and may run to megabytes (each preview is kept
    in the daemon's memory): previews carry them printable and at most 300 characters long, and
    the listings the object's title so too."""
    from uproot.writing.identify import to_TAxis, to_TH1x

    from dqm_daemon.previews import read_previews

    path = tmp_path / "titles.root"
    values = np.array([0.0, 1.0, 2.0, 0.0])
    histogram = to_TH1x(
        "h", "T" * 20_000 + "\n", values, fEntries=3.0, fTsumw=3.0, fTsumw2=3.0, fTsumwx=0.0,
        fTsumwx2=0.0, fSumw2=values,  # the title as long as a key header allows
        fXaxis=to_TAxis("xaxis", "X" * 2_000_000, 2, 0.0, 1.0))  # in the payload: no limit
    with uproot.recreate(path) as root_file:
        root_file["h"] = histogram
    for listed in (inspect_file(path)["objects"], analyse_file(path)["objects"]):
        assert len(listed[0]["title"]) == 300  # in the listings too
    (preview,) = read_previews(path, ["h"], 100)["previews"].values()
    assert preview["values"] == [1, 2]
    assert len(preview["title"]) == 300 and preview["title"].endswith("…")
    assert len(preview["axes"][0]["title"]) == 300


def test_deep_directories_of_long_names_are_listed_within_the_size_limit(tmp_path,
                                                                         monkeypatch):
    """Every object's path repeats its directories' names: a file of a few MB, deep directories
    of long names over many objects, would list gigabytes (the catalog, the pages). The check
    and the analysis list objects up to the size limit, flag the listing cut, and the file is
    still sound."""
    path = tmp_path / "deep.root"
    deep = "/".join(f"d{level}{'x' * 300}" for level in range(8))  # a path of 2.4 kB
    with uproot.recreate(path) as root_file:
        root_file["top"] = th1f("top", "at the top", [1, 2])
        for index in range(50):
            root_file[f"{deep}/h{index}"] = th1f(f"h{index}", "deep down", [index, 1])
    monkeypatch.setattr(inspection, "MAX_LISTED_CHARS", 40_000)
    for result in (inspect_file(path), analyse_file(path)):
        assert result["state"] == "ok", result
        assert result["objects_truncated"] is True
        listed = sum(len(entry["path"]) + len(entry["class"]) + len(entry["title"])
                     for entry in result["objects"])
        assert 30_000 < listed <= 40_000
        assert result["objects"][0]["path"] == "top"
    assert inspect_file(path)["received"] == {
        "top": "Obj name: top, Obj IsA() Name: TH1F",
        "d0" + "x" * 300: f"Obj name: d0{'x' * 300}, Obj IsA() Name: TDirectoryFile"}
    monkeypatch.setattr(inspection, "MAX_LISTED_CHARS", 10_000_000)
    assert inspect_file(path)["objects_truncated"] is False
