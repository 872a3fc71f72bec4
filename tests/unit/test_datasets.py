"""ReasonSeg folders and manifests -> Query rows; clear errors naming the file."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from rea2seg_ray.datasets import DatasetError, load_ground_truth, read_queries
from rea2seg_ray.records import make_query_id

from ..conftest import REASONSEG_SAMPLES

SAMPLE_JSON = REASONSEG_SAMPLES / "scene0104_00_0.json"


def _reasonseg_folder(tmp_path):
    """The real ReasonSeg annotation beside a 320x240 image (its own image is not distributed)."""
    folder = tmp_path / "val"
    folder.mkdir()
    shutil.copy(SAMPLE_JSON, folder / "scene0104_00_0.json")
    Image.new("RGB", (320, 240), (90, 90, 90)).save(folder / "scene0104_00_0.jpg")
    anno = json.loads(SAMPLE_JSON.read_text())
    anno["text"] = ["first phrasing?", "second phrasing?"]
    anno["is_sentence"] = False
    (folder / "b_two_texts.json").write_text(json.dumps(anno))
    Image.new("RGB", (320, 240)).save(folder / "b_two_texts.png")
    return folder


def test_reasonseg_folder_queries_ids_and_categories(tmp_path):
    folder = _reasonseg_folder(tmp_path)
    qs = list(read_queries(str(folder)))
    assert [q.query_id for q in qs] == ["b_two_texts", "scene0104_00_0"]
    assert qs[1].question.startswith("When we need to access or store things above our reach")
    assert qs[1].category == "long" and qs[0].category == "short"
    assert qs[0].image.endswith("b_two_texts.png")
    qs_all = list(read_queries(str(folder), texts="all"))
    assert [q.query_id for q in qs_all] == ["b_two_texts:0", "b_two_texts:1", "scene0104_00_0:0"]
    assert [q.question for q in qs_all[:2]] == ["first phrasing?", "second phrasing?"]
    # Stable across runs.
    assert [q.query_id for q in read_queries(str(folder), texts="all")] == [q.query_id for q in qs_all]
    gt = load_ground_truth(qs[1])
    assert gt.shape == (240, 320) and set(np.unique(gt)) == {0, 1, 255}


def test_malformed_json_names_the_file(tmp_path):
    folder = _reasonseg_folder(tmp_path)
    (folder / "broken.json").write_text('{"text": ["x"], "shapes": [')
    Image.new("RGB", (8, 8)).save(folder / "broken.jpg")
    with pytest.raises(DatasetError, match=r"broken\.json: malformed JSON"):
        list(read_queries(str(folder)))
    # Lenient mode (what the pipeline uses): an error query instead of a crash, rows kept.
    qs = list(read_queries(str(folder), strict=False))
    bad = [q for q in qs if q.query_id == "broken"]
    assert len(qs) == 3 and "malformed JSON" in bad[0].meta["error"]


def test_missing_image_names_the_file(tmp_path):
    folder = _reasonseg_folder(tmp_path)
    (folder / "scene0104_00_0.jpg").unlink()
    with pytest.raises(DatasetError, match=r"scene0104_00_0\.jpg: image not found"):
        list(read_queries(str(folder)))


def test_polygon_with_fewer_than_three_points_names_file_and_shape(tmp_path):
    folder = _reasonseg_folder(tmp_path)
    anno = {"text": ["q"], "is_sentence": False, "shapes": [{"label": "target", "points": [[1, 1], [5, 5]]}]}
    (folder / "twopoint.json").write_text(json.dumps(anno))
    Image.new("RGB", (8, 8)).save(folder / "twopoint.jpg")
    with pytest.raises(
        DatasetError, match=r"twopoint\.json: shape 0 \('target'\) is a polygon with 2 point\(s\)"
    ):
        list(read_queries(str(folder)))


def test_manifest_relative_paths_derived_ids_and_conversations(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (10, 8)).save(tmp_path / "imgs" / "a.jpg")
    rows = [
        {"image": "imgs/a.jpg", "question": "the cup?", "category": "short"},
        {
            "query_id": "conv-1",
            "image": "imgs/a.jpg",
            "conversation": [
                {"role": "user", "content": "What is on the table?"},
                {"role": "assistant", "content": "A cup and a knife."},
                {"role": "user", "content": "The one you cut with."},
            ],
        },
    ]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qs = list(read_queries(str(m)))
    assert qs[0].image == str(tmp_path / "imgs" / "a.jpg")
    assert qs[0].query_id == make_query_id("imgs/a.jpg", "the cup?")
    assert [q.query_id for q in read_queries(str(m))] == [q.query_id for q in qs]
    assert qs[1].query_id == "conv-1" and qs[1].text().endswith("user: The one you cut with.")
    # A bad line names file and line.
    m.write_text(m.read_text() + "{not json\n")
    with pytest.raises(DatasetError, match=r"m\.jsonl line 3: malformed JSON"):
        list(read_queries(str(m)))
    assert len(list(read_queries(str(m), strict=False))) == 3


def test_parquet_manifest(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    Image.new("RGB", (10, 8)).save(tmp_path / "a.jpg")
    pq.write_table(
        pa.Table.from_pylist([{"query_id": "p1", "image": "a.jpg", "question": "q"}]), tmp_path / "m.parquet"
    )
    (q,) = list(read_queries(str(tmp_path / "m.parquet")))
    assert (q.query_id, q.image) == ("p1", str(tmp_path / "a.jpg"))


def test_candidate_descriptions_must_match_the_candidates(tmp_path):
    Image.new("RGB", (10, 8)).save(tmp_path / "a.jpg")
    rle = {"size": [8, 10], "counts": "P1"}
    rows = [
        {"query_id": "ok", "image": "a.jpg", "question": "q", "candidates": [rle], "candidate_descriptions": ["red bar"]},
        {"query_id": "short", "image": "a.jpg", "question": "q", "candidates": [rle, rle], "candidate_descriptions": ["x"]},
    ]  # fmt: skip
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        DatasetError, match=r"m\.jsonl row 2: 'candidate_descriptions' must be a list of strings, one per"
    ):
        list(read_queries(str(m)))
    ok, bad = read_queries(str(m), strict=False)
    assert ok.meta["candidate_descriptions"] == ["red bar"]
    assert bad.query_id == "short" and "candidate_descriptions" in bad.meta["error"]
