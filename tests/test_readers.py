"""Generic readers: every error names the file and the line or record."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES

from compressor.data.readers import (
    Location, check_entities, iter_lines, read_conll04, read_conll_blocks, read_json, read_jsonl, read_text,
)
from compressor.errors import DataError


def test_location_formats_line_and_record():
    assert str(Location("a.txt", line=3)) == "a.txt:3"
    assert str(Location("a.json", record=7)) == "a.json [record 7]"
    err = Location("a.txt", line=3).error("bad label")
    assert isinstance(err, DataError) and str(err) == "a.txt:3: bad label" and err.line == 3


def test_missing_file_and_bad_utf8_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt: file not found"):
        read_text(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok line\nsecond \xff line\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: not valid UTF-8") as exc:
        read_text(bad)
    assert exc.value.line == 2


def test_iter_lines_numbers_from_one_and_strips_bom(tmp_path):
    p = tmp_path / "x.txt"
    p.write_bytes("\ufeffa\r\nb\n\nc".encode())
    assert list(iter_lines(p)) == [(1, "a"), (2, "b"), (3, ""), (4, "c")]


def test_read_jsonl_skips_blank_lines_and_reports_line_of_bad_json(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(p) == [(1, {"a": 1}), (3, {"a": 2})]
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: invalid JSON"):
        read_jsonl(p)
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: expected a JSON object, got list"):
        read_jsonl(p)


def test_read_json_reports_line(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('[\n{"a": 1},\n{"a" 2}\n]')
    with pytest.raises(DataError, match=r"x\.json:3: invalid JSON"):
        read_json(p)


def test_conll_blocks_skip_docstart_and_keep_line_numbers():
    blocks = read_conll_blocks(FIXTURES / "ner" / "tiny.conll")
    assert [len(b) for b in blocks] == [5, 2, 2, 5]
    assert blocks[0][0].line == 3 and blocks[0][0].columns == ["EU", "NNP", "B-NP", "B-ORG"]
    assert blocks[3][0].line == 17 and blocks[3][0].columns[0] == "Only"


def test_read_conll04_fixture():
    records = read_conll04(FIXTURES / "ner" / "conll04_tiny.json")
    assert len(records) == 6
    first = records[0]
    assert first["index"] == 0
    assert first["entities"] == [(0, 2, "Peop"), (4, 6, "Org"), (7, 8, "Loc")]
    assert first["relations"] == [(0, 2, 4, 6, "Work_For"), (4, 6, 7, 8, "OrgBased_In")]
    assert records[5]["relations"] == []


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"tokens": ["a", "b", "c"], "entities": [[0, 2, "X"], [1, 3, "Y"]]}, r"overlap"),
        ({"tokens": ["a", "b"], "entities": [[1, 3, "X"]]}, r"outside the sentence of 2 tokens"),
        ({"tokens": ["a", "b"], "entities": [[1, 1, "X"]]}, r"outside the sentence"),
        ({"tokens": ["a", "b"], "entities": [[0, 1]]}, r"entities\[0\] must be \[start, end, type\]"),
        ({"tokens": ["a", "b"], "entities": [[0, 1, "X"]], "relations": [[0, 1, 1, 2, "R"]]},
         r"tail span \[1, 2\) is not an entity"),
        ({"tokens": ["a"], "entities": [], "relations": [[0, 1, "R"]]}, r"relations\[0\] must be"),
        ({"tokens": "a b"}, r"'tokens' must be a list of strings"),
        ({"tokens": []}, r"'tokens' is empty"),
    ],
)
def test_read_conll04_rejects_bad_records_naming_the_record(tmp_path, record, message):
    p = tmp_path / "bad.json"
    good = {"tokens": ["x"], "entities": [[0, 1, "Loc"]], "relations": []}
    p.write_text(json.dumps([good, good, record]))
    with pytest.raises(DataError, match=rf"bad\.json \[record 2\]: .*{message}") as exc:
        read_conll04(p)
    assert exc.value.record == 2


def test_read_conll04_needs_an_array(tmp_path):
    p = tmp_path / "obj.json"
    p.write_text('{"tokens": []}')
    with pytest.raises(DataError, match="expected a JSON array"):
        read_conll04(p)


def test_check_entities_sorts_and_validates():
    assert check_entities([[3, 4, "B"], [0, 2, "A"]], 4) == [(0, 2, "A"), (3, 4, "B")]
    with pytest.raises(ValueError, match="overlap"):
        check_entities([[0, 2, "A"], [0, 2, "B"]], 4)
    with pytest.raises(ValueError, match="must be"):
        check_entities([[True, 2, "A"]], 4)
