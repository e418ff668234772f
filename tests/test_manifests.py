"""Manifest readers: every format on small files written here (always run) and on the real
annotation files next to the repository (skipped when that folder is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avmae.config import DataConfig
from avmae.data.manifests import (
    ManifestError,
    parse_timestamp,
    read_class_list,
    read_manifest,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real annotation files not found at {SHARED}")


def write(path: Path, text: str, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode())
    return path


# ---------------------------------------------------------------------------------------------
# written samples


def test_synthetic(tmp_path):
    write(tmp_path / "classes.txt", "bounce\nspin\n")
    write(tmp_path / "train.csv", "id,video,label\na,clips/a.mp4,1\nb,clips/b.mp4,0\n")
    m = read_manifest(DataConfig(root=str(tmp_path)), "train")
    assert [(r.id, r.video, r.targets) for r in m.records] == [
        ("a", tmp_path / "clips/a.mp4", {"label": 1}),
        ("b", tmp_path / "clips/b.mp4", {"label": 0}),
    ]
    assert m.classes == {"label": ["bounce", "spin"]} and not m.multi_label
    write(tmp_path / "val.csv", "id,video,label\na,a.mp4,1\nb,b.mp4,2\n")
    with pytest.raises(ManifestError, match=r"val.csv:3: label 2 outside the 2 classes"):
        read_manifest(DataConfig(root=str(tmp_path)), "val")
    write(tmp_path / "test.csv", "video,label\na.mp4,1\n")
    with pytest.raises(ManifestError, match=r"test.csv:1: expected the header id,video,label"):
        read_manifest(DataConfig(root=str(tmp_path)), "test")


VGGSOUND = """---g-f_I2yQ,1,people marching,test
--0PQM4-hqg,30,waterfall burbling,train
--9O4XZOge4,30,"female speech, woman speaking",train
-0BKyt8iZ1I,0,people marching,train
"""


def test_vggsound_crlf_quoted_labels_and_splits(tmp_path):
    csv_path = write(tmp_path / "vggsound.csv", VGGSOUND.rstrip("\n"), newline="\r\n")  # CRLF, no final newline
    cfg = DataConfig(format="vggsound", root=str(tmp_path / "clips"), train=str(csv_path), val=str(csv_path), test=str(csv_path))
    train = read_manifest(cfg, "train")
    sorted_labels = ["female speech, woman speaking", "people marching", "waterfall burbling"]
    assert train.classes == {"label": sorted_labels}
    assert [(r.id, r.video.name, r.targets["label"]) for r in train.records] == [
        ("--0PQM4-hqg_000030", "--0PQM4-hqg_000030.mp4", 2),
        ("--9O4XZOge4_000030", "--9O4XZOge4_000030.mp4", 0),
        ("-0BKyt8iZ1I_000000", "-0BKyt8iZ1I_000000.mp4", 1),
    ]
    test = read_manifest(cfg, "test")
    assert [r.video.name for r in test.records] == ["---g-f_I2yQ_000001.mp4"]
    assert test.classes == train.classes  # one class list for all splits
    assert [r.id for r in read_manifest(cfg, "val").records] == ["---g-f_I2yQ_000001"]

    # an explicit class list (stat.csv layout: label,count,category; CRLF, no final newline)
    stat = write(tmp_path / "stat.csv", '"female speech, woman speaking",1050,people\nwaterfall burbling,900,nature\npeople marching,800,people', "\r\n")
    cfg.label_file = str(stat)
    assert [r.targets["label"] for r in read_manifest(cfg, "train").records] == [1, 0, 2]
    cfg.video_template = "{ytid}/{start}.mp4"
    assert read_manifest(cfg, "train").records[0].video == tmp_path / "clips" / "--0PQM4-hqg" / "30.mp4"

    bad = write(tmp_path / "bad.csv", VGGSOUND + "abc,12,people marching\n")
    cfg.train = str(bad)
    with pytest.raises(ManifestError, match=r"bad.csv:5: expected 4 fields"):
        read_manifest(cfg, "train")
    write(bad, VGGSOUND + "abc,12,barking dogs,train\n")
    with pytest.raises(ManifestError, match=r"bad.csv:5: label 'barking dogs' is not in the class list"):
        read_manifest(cfg, "train")
    write(bad, VGGSOUND + "abc,twelve,people marching,train\n")
    with pytest.raises(ManifestError, match=r"bad.csv:5: start_seconds must be an integer"):
        read_manifest(cfg, "train")


LABELS_CSV = 'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n2,/t/dd00088,"Gush"\n3,/g/122z_qxw,"Firecracker"\n'
SEGMENTS = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=3, num_segs=3, num_unique_labels=4, num_positive_labels=5
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"
-0p7hKXZ1ww, 30.000, 40.000, "/g/122z_qxw,/m/09x0r"
--i-y1v8Hy8, 0.000, 9.000, "/m/05zppz"
"""


def test_audioset_segments_multi_label(tmp_path):
    write(tmp_path / "meta" / "class_labels_indices.csv", LABELS_CSV)
    segments = write(tmp_path / "meta" / "balanced_train_segments.csv", SEGMENTS)
    cfg = DataConfig(format="audioset", root=str(tmp_path / "videos"), train=str(segments))
    m = read_manifest(cfg, "train")  # label csv found next to the manifest
    assert m.multi_label and m.classes["label"][1] == "Male speech, man speaking"
    assert [(r.id, r.video.name, r.targets["label"]) for r in m.records] == [
        ("--PJHxphWEs_30.000", "--PJHxphWEs.mp4", [0, 2]),
        ("-0p7hKXZ1ww_30.000", "-0p7hKXZ1ww.mp4", [0, 3]),
        ("--i-y1v8Hy8_0.000", "--i-y1v8Hy8.mp4", [1]),
    ]
    cfg.video_template = "{ytid}_{start:.3f}.mp4"
    assert read_manifest(cfg, "train").records[0].video.name == "--PJHxphWEs_30.000.mp4"
    write(segments, SEGMENTS + '-abcdefghij, 0.000, 10.000, "/m/unknown"\n')
    with pytest.raises(ManifestError, match=r"balanced_train_segments.csv:7: label '/m/unknown' is not in"):
        read_manifest(cfg, "train")
    cfg.label_file = str(tmp_path / "nowhere.csv")
    with pytest.raises(ManifestError, match="nowhere.csv: file not found"):
        read_manifest(cfg, "train")


EPIC_HEADER = (
    "narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame,"
    "stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes\n"
)
EPIC_ROWS = (
    "P01_11_0,P01,P01_11,00:00:00.560,00:00:00.00,00:00:01.89,1,113,take plate,take,0,plate,2,['plate'],[2]\n"
    "P01_11_13,P01,P01_11,00:01:02.010,00:01:01.24,00:01:03.04,3674,3782,put paper in bin,put,1,paper,1,"
    "\"['paper', 'bin']\",\"[1, 0]\"\n"
    "P02_12_293,P02,P02_12,,01:17:47.56,01:17:50.75,64053,64245,roll,roll,2,ball:dough,0,['ball:dough'],[0]\n"
)
EPIC_VERBS = 'id,key,instances,category\n0,take,"[\'take\', \'get\']",retrieve\n1,put,"[\'put\']",leave\n2,roll,"[\'roll\']",manipulate'
EPIC_NOUNS = 'id,key,instances,category\n0,bin,"[\'bin\']",waste\n1,paper,"[\'paper\']",materials\n2,plate,"[\'plate\']",crockery'


def test_epic_segments_verbs_and_nouns(tmp_path):
    write(tmp_path / "ann" / "EPIC_100_verb_classes.csv", EPIC_VERBS, "\r\n")
    write(tmp_path / "ann" / "EPIC_100_noun_classes.csv", EPIC_NOUNS, "\r\n")
    train = write(tmp_path / "ann" / "EPIC_100_train.csv", EPIC_HEADER + EPIC_ROWS)
    cfg = DataConfig(format="epic", root=str(tmp_path / "EPIC-KITCHENS"), train=str(train))
    m = read_manifest(cfg, "train")
    assert m.classes == {"verb": ["take", "put", "roll"], "noun": ["bin", "paper", "plate"]}
    first, second, third = m.records
    assert first.video == tmp_path / "EPIC-KITCHENS" / "P01" / "videos" / "P01_11.MP4"
    assert (first.start, first.end, first.targets) == (0.0, 1.89, {"verb": 0, "noun": 2})
    assert second.targets == {"verb": 1, "noun": 1} and second.start == pytest.approx(61.24)
    assert third.id == "P02_12_293" and third.start == pytest.approx(4667.56) and third.end == pytest.approx(4670.75)

    # the test set has no class columns: records without targets
    test = write(tmp_path / "ann" / "EPIC_100_test_timestamps.csv",
                 "narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame,stop_frame\n"
                 "P01_101_0,P01,P01_101,00:00:00.500,00:00:00.10,00:00:02.00,5,120\n")
    cfg.test = str(test)
    assert read_manifest(cfg, "test").records[0].targets == {}

    for row, problem in (
        ("P01_11_1,P01,P01_11,,00:00:0x.00,00:00:01.89,1,113,take,take,0,plate,2,['plate'],[2]\n", "timestamp must look like HH:MM:SS.ff"),
        ("P01_11_1,P01,P01_11,,00:00:03.00,00:00:01.89,1,113,take,take,0,plate,2,['plate'],[2]\n", "is before start_timestamp"),
        ("P01_11_1,P01,P01_11,,00:00:00.00,00:00:01.89,1,113,take,take,7,plate,2,['plate'],[2]\n", "verb_class 7 outside the 3 verb classes"),
        ("P01_11_1,P01,P01_11,,00:00:00.00,00:00:01.89,1,113,take,take,0,plate,2,['plate'],[1]\n", "noun_class 2 is not in all_noun_classes"),
        ("P01_11_1,P01,P01_11,,00:00:00.00,00:00:01.89,1,113,take,take,0,plate,2,['plate'],[2\n", "all_noun_classes is not a list"),
        ("P01_11_1,P01,P01_11,,00:00:00.00,00:00:01.89,1,113\n", "expected 15 fields, got 8"),
    ):
        write(train, EPIC_HEADER + EPIC_ROWS + row)
        with pytest.raises(ManifestError, match=rf"EPIC_100_train.csv:5: .*{problem}"):
            read_manifest(cfg, "train")
    assert parse_timestamp("00:17:47.56") == pytest.approx(1067.56)
    assert parse_timestamp("01:00:00") == 3600.0


AVE_LINES = """Church bell&RUhOCu3LNXM&good&0&10
Church bell&MH3m4AwEcRY&good&6&8
Church bell&VWi2ENBuTbw&good&0&0
Male speech, man speaking&fWQOVfO2UcU&good&2&9
Rodents, rats, mice&MH3m4AwEcRY&good&1&3
"""


def test_ave_with_and_without_header(tmp_path):
    plain = write(tmp_path / "Annotations.txt", AVE_LINES)
    headed = write(tmp_path / "withheader.txt", "Category&VideoID&Quality&StartTime&EndTime\n" + AVE_LINES)
    cfg = DataConfig(format="ave", root=str(tmp_path / "AVE"), train=str(plain), val=str(headed), test=str(headed))
    m = read_manifest(cfg, "train")
    assert m.classes == {"label": ["Church bell", "Male speech, man speaking", "Rodents, rats, mice"]}
    assert all(isinstance(r.start, float) and isinstance(r.end, float) for r in m.records)
    assert [(r.id, r.video.name, r.start, r.end, r.targets["label"]) for r in m.records] == [
        ("RUhOCu3LNXM_0_10", "RUhOCu3LNXM.mp4", 0.0, 10.0, 0),
        ("MH3m4AwEcRY_6_8", "MH3m4AwEcRY.mp4", 6.0, 8.0, 0),
        ("VWi2ENBuTbw_0_0", "VWi2ENBuTbw.mp4", 0.0, 0.0, 0),  # zero-length event
        ("fWQOVfO2UcU_2_9", "fWQOVfO2UcU.mp4", 2.0, 9.0, 1),
        ("MH3m4AwEcRY_1_3", "MH3m4AwEcRY.mp4", 1.0, 3.0, 2),  # one video, two events
    ]
    assert [r.id for r in read_manifest(cfg, "val").records] == [r.id for r in m.records]
    cfg.label_file = str(write(tmp_path / "categories.txt", "Rodents, rats, mice\nChurch bell\nMale speech, man speaking\n"))
    assert [r.targets["label"] for r in read_manifest(cfg, "train").records] == [1, 1, 1, 2, 0]
    write(plain, AVE_LINES + "Bark&abc&good&3\n")
    with pytest.raises(ManifestError, match=r"Annotations.txt:6: expected 5 '&'-separated fields"):
        read_manifest(cfg, "train")
    write(plain, AVE_LINES + "Bark&abc&good&3&4\n")
    with pytest.raises(ManifestError, match=r"Annotations.txt:6: category 'Bark' is not in the class list"):
        read_manifest(cfg, "train")


def test_cavmae_json(tmp_path):
    labels = write(tmp_path / "class_labels_indices_as.csv", LABELS_CSV)
    (tmp_path / "frames").mkdir()
    data = {"data": [
        {"video_id": "--4gqARaEJE", "wav": "/data/audio/--4gqARaEJE.flac", "video_path": "frames/", "labels": "/m/09x0r,/g/122z_qxw"},
        {"video_id": "x1", "wav": "audio/x1.flac", "video_path": "videos/x1.mp4", "labels": "/m/05zppz"},
    ]}
    manifest = write(tmp_path / "train.json", json.dumps(data, indent=1))
    cfg = DataConfig(format="cavmae", root=str(tmp_path), train=str(manifest), label_file=str(labels))
    m = read_manifest(cfg, "train")
    assert m.multi_label and m.classes["label"][3] == "Firecracker"
    first, second = m.records
    assert first.video == tmp_path / "frames" / "--4gqARaEJE.mp4"  # video_path is a folder
    assert first.audio == Path("/data/audio/--4gqARaEJE.flac") and first.targets == {"label": [0, 3]}
    assert (second.video, second.audio) == (tmp_path / "videos" / "x1.mp4", tmp_path / "audio" / "x1.flac")
    cfg.audio_root = str(tmp_path / "flac")  # moved audio: looked up by file name
    assert read_manifest(cfg, "train").records[0].audio == tmp_path / "flac" / "--4gqARaEJE.flac"

    data["data"][1]["labels"] = "/m/nope"
    write(manifest, json.dumps(data))
    with pytest.raises(ManifestError, match=r"train.json: entry 1 \(x1\): label '/m/nope'"):
        read_manifest(cfg, "train")
    write(manifest, ' # a comment line\n {\n    "data": []\n}')  # the AST sample's layout
    with pytest.raises(ManifestError, match=r"train.json:1: not valid JSON"):
        read_manifest(cfg, "train")
    cfg.label_file = None
    with pytest.raises(ManifestError, match="needs data.label_file"):
        read_manifest(cfg, "train")


def test_separate_audio_files_and_class_lists(tmp_path):
    write(tmp_path / "classes.txt", "a\nb\n")
    write(tmp_path / "train.csv", "id,video,label\nclip1,clips/clip1.mp4,0\n")
    cfg = DataConfig(root=str(tmp_path), audio_root=str(tmp_path / "wav"))
    assert read_manifest(cfg, "train").records[0].audio == tmp_path / "wav" / "clip1.wav"
    cfg.audio_template = "{id}/{stem}.flac"
    assert read_manifest(cfg, "train").records[0].audio == tmp_path / "wav" / "clip1" / "clip1.flac"
    cfg.audio_template = "{ytid}.wav"
    with pytest.raises(ManifestError, match="audio_template"):
        read_manifest(cfg, "train")
    assert read_class_list(write(tmp_path / "one_column.csv", "dog\ncat\n")) == ["dog", "cat"]
    with pytest.raises(ManifestError, match="index 5 out of order"):
        read_class_list(write(tmp_path / "bad_index.csv", 'index,mid,display_name\n5,/m/x,"X"\n'))
    with pytest.raises(ManifestError, match="missing.txt: file not found"):
        read_class_list(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="split must be one of"):
        read_manifest(cfg, "training")


# ---------------------------------------------------------------------------------------------
# the real annotation files


@needs_shared
def test_real_audioset():
    cfg = DataConfig(format="audioset", root="/videos", train=str(SHARED / "audioset/balanced_train_segments.csv"),
                     test=str(SHARED / "audioset/eval_segments.csv"))
    train, test = read_manifest(cfg, "train"), read_manifest(cfg, "test")
    assert len(train) == 197 and len(test) == 197 and len(train.classes["label"]) == 527
    assert train.records[0].id == "--PJHxphWEs_30.000" and train.classes["label"][train.records[0].targets["label"][0]] == "Speech"
    firecracker = next(r for r in test.records if r.id.startswith("-0p7hKXZ1ww"))  # a /g/ mid
    assert len(firecracker.targets["label"]) == 2
    assert max(len(r.targets["label"]) for r in train.records + test.records) <= 9


@needs_shared
def test_real_vggsound():
    csv_path = str(SHARED / "vggsound/vggsound.csv")
    cfg = DataConfig(format="vggsound", root="/v", train=csv_path, val=csv_path, test=csv_path,
                     label_file=str(SHARED / "vggsound/stat.csv"))
    train, test = read_manifest(cfg, "train"), read_manifest(cfg, "test")
    assert (len(train), len(test), len(train.classes["label"])) == (362, 38, 309)
    speech = next(r for r in train.records if r.id == "--9O4XZOge4_000030")
    assert train.classes["label"][speech.targets["label"]] == "female speech, woman speaking"
    cfg.label_file = str(SHARED / "vggsound/class_labels_indices_vgg.csv")
    names = read_manifest(cfg, "train").classes["label"]
    assert len(names) == 310 and names[:309] == train.classes["label"]


@needs_shared
def test_real_epic():
    ann = SHARED / "epic_kitchens_100"
    cfg = DataConfig(format="epic", root="/epic", train=str(ann / "EPIC_100_uda_source_train.csv"),
                     val=str(ann / "EPIC_100_validation.csv"), test=str(ann / "EPIC_100_validation.edge_rows.csv"))
    train, val, edge = (read_manifest(cfg, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(edge)) == (200, 100, 5)
    assert val.num_classes == {"verb": 97, "noun": 300}
    first = val.records[0]
    assert (first.id, first.start, first.end, first.targets) == ("P01_11_0", 0.0, 1.89, {"verb": 0, "noun": 2})
    assert first.video == Path("/epic/P01/videos/P01_11.MP4")
    assert train.records[0].targets == {"verb": 3, "noun": 3}  # open door
    assert edge.records[0].start == pytest.approx(1067.56)
    assert all(r.end >= r.start for r in train.records + val.records)


@needs_shared
def test_real_ave():
    ave = SHARED / "ave"
    cfg = DataConfig(format="ave", root="/ave", train=str(ave / "DG-SCT/trainSet.txt"), val=str(ave / "DG-SCT/valSet.txt"),
                     test=str(ave / "DG-SCT/testSet.txt"), label_file=str(ave / "DG-SCT/categories.txt"))
    sizes = [len(read_manifest(cfg, s)) for s in ("train", "val", "test")]
    assert sizes == [3339, 402, 402]
    for annotation_file in ("AVE-ECCV18/Annotations.txt", "DG-SCT/Annotations.txt"):
        cfg.train = str(ave / annotation_file)
        m = read_manifest(cfg, "train")
        assert len(m) == 4143 and m.num_classes == {"label": 28}
        assert m.records[0].targets == {"label": 0} and m.records[1].start == 6.0
        assert (m.records[26].start, m.records[26].end) == (0.0, 0.0)  # line 27, zero-length event


@needs_shared
def test_real_cavmae_and_ast_json():
    cav = SHARED / "cavmae"
    cfg = DataConfig(format="cavmae", root="/data", train=str(cav / "sample_json_as.json"),
                     label_file=str(cav / "class_labels_indices_as.csv"))
    m = read_manifest(cfg, "train")
    assert len(m) == 20 and m.num_classes == {"label": 527}
    assert m.records[0].video == Path("/data/sls/audioset/dave_version/image_mulframe/--4gqARaEJE.mp4")
    assert m.records[0].audio.suffix == ".flac" and len(m.records[0].targets["label"]) == 4
    cfg.train = str(SHARED / "ast/sample_train_data.json")
    with pytest.raises(ManifestError, match=r"sample_train_data.json:1: not valid JSON"):
        read_manifest(cfg, "train")
