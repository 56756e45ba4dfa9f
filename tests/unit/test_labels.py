import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from defectvlm.data.labels import (
    LabelError,
    decode_text,
    detect_format,
    escapes_root,
    image_name,
    parse_class_names,
    parse_label_text,
    parse_labelstudio,
    parse_semicolon,
    parse_yolo,
    strip_upload_prefix,
)


def test_semicolon_mixed_delimiters_and_several_boxes_in_one_field():
    boxes = parse_semicolon("a.jpg ; 1190；206；1712；377  1813；555，1866 636 ; 灰渣\n")
    assert [b.xyxy for b in boxes] == [(1190, 206, 1712, 377), (1813, 555, 1866, 636)]
    assert {b.label for b in boxes} == {"灰渣"} and {b.filename for b in boxes} == {"a.jpg"}


def test_semicolon_type_starts_after_the_last_delimiter_and_filename_ends_at_the_first():
    (box,) = parse_semicolon("dir/a b.jpg；1;2;3;4；过熔 ")
    assert box.filename == "dir/a b.jpg" and box.label == "过熔" and box.xyxy == (1, 2, 3, 4)


def test_semicolon_cxcywh():
    (box,) = parse_semicolon("a.jpg;50,40,20,10;slag", coord_format="cxcywh")
    assert box.xyxy == (40, 35, 60, 45)


def test_fullwidth_digits_fold_to_ascii():
    (box,) = parse_semicolon("a.jpg;１０,２０,３０,４０;slag")
    assert box.xyxy == (10, 20, 30, 40)


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("a.jpg;1,2,3;slag", "coords_not_multiple_of_4"),
        ("a.jpg;1,2,x,4;slag", "bad_number"),
        ("a.jpg 1 2 3 4 slag", "bad_columns"),
        ("a.jpg;1,2,3,4;", "missing_type"),
        ("a.jpg;;slag", "no_coordinates"),
    ],
)
def test_semicolon_errors_carry_code_and_line(line, code):
    with pytest.raises(LabelError) as info:
        parse_semicolon(f"# header\n\nok.jpg;1,2,3,4;slag\n{line}\n")
    assert info.value.code == code and info.value.line == 4
    assert info.value.located("x.txt").startswith("x.txt:4: ")


@pytest.mark.parametrize(
    "line",
    [
        "；a.jpg；10,20,30,40；灰渣",  # leading
        "a.jpg;10,20,30,40;灰渣;",  # trailing
        "a.jpg ; 10,20,30,40 ; 灰渣 ；； ",  # trailing, doubled, with blanks
        ";; a.jpg;;10,20,30,40;;灰渣;;",  # doubled everywhere
        " ; a.jpg ;\t; 10 20 30 40 ; ; 灰渣 ;",  # blank columns
    ],
)
def test_semicolon_stray_delimiters_and_blank_columns_are_skipped(line):
    (box,) = parse_semicolon(line + "\n")
    assert (box.filename, box.xyxy, box.label) == ("a.jpg", (10, 20, 30, 40), "灰渣")


def test_semicolon_without_filename_column_and_with_stray_delimiters():
    (box,) = parse_semicolon(";10,20,30,40;灰渣;")
    assert (box.filename, box.xyxy, box.label) == (None, (10, 20, 30, 40), "灰渣")
    (box,) = parse_semicolon("0001;10,20,30,40;7")  # no stray delimiter: the columns keep their places
    assert (box.filename, box.xyxy, box.label) == ("0001", (10, 20, 30, 40), "7")


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (";;;", "bad_columns"),
        ("a.jpg;10,20,30,40 灰渣", "bad_columns"),
        ("a.jpg;10,20,30,40;;", "missing_type"),
        ("a.jpg;;", "missing_type"),
        ("；a.jpg；10,20,30,40 灰渣", "no_coordinates"),
        ("a.jpg;;10,20,30;;灰渣;", "coords_not_multiple_of_4"),
        ("a.jpg;10,20,30,40;灰渣;extra;", "bad_number"),
    ],
)
def test_semicolon_lines_that_stay_unreadable_with_stray_delimiters(line, code):
    with pytest.raises(LabelError) as info:
        parse_semicolon(line)
    assert info.value.code == code and info.value.line == 1


def test_encodings():
    body = "a.jpg；1,2,3,4；灰渣\r\n"
    for encoding, name in [("utf-8", "utf-8"), ("utf-8-sig", "utf-8-sig"), ("gbk", "gb18030"), ("utf-16", "utf-16")]:
        text, found = decode_text(body.encode(encoding))
        assert (text, found) == (body, name)
    with pytest.raises(LabelError) as info:
        decode_text(b"a.jpg;1,2,3,4;\x80\x80")
    assert info.value.code == "undecodable_label"


def test_yolo_and_class_names():
    names = parse_class_names("slag\nstreak\n", is_yaml=False)
    (box,) = parse_yolo("1 0.5 0.5 0.2 0.4\n", names)
    assert box.label == "streak" and box.xyxy == pytest.approx((0.4, 0.3, 0.6, 0.7))
    assert parse_class_names("names: {0: a, 1: b}\n", is_yaml=True) == ["a", "b"]
    assert parse_class_names("names: [a, b]\n", is_yaml=True) == ["a", "b"]
    for text, code in [
        ("3 0.5 0.5 0.1 0.1", "bad_class_index"),
        ("0 300 200 40 40", "not_normalised"),
        ("0 0.5 0.5 0.1", "bad_columns"),
    ]:
        with pytest.raises(LabelError) as info:
            parse_yolo(text, names)
        assert info.value.code == code
    with pytest.raises(LabelError, match="classes.txt"):
        parse_yolo("0 0.5 0.5 0.1 0.1", None)


def test_labelstudio_export():
    export = [
        {
            "data": {"image": "/data/upload/3/ab12cd34-img_1.jpg"},
            "annotations": [
                {
                    "result": [
                        {
                            "type": "rectanglelabels",
                            "original_width": 200,
                            "original_height": 100,
                            "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rectanglelabels": ["灰渣"]},
                        },
                        {"type": "choices", "value": {"choices": ["x"]}},
                    ]
                }
            ],
        },
        {"data": {"image": "/data/local-files/?d=batch/img_2.jpg"}, "annotations": []},
    ]
    first, second = parse_labelstudio(json.dumps(export, ensure_ascii=False))
    assert first.image_ref == "ab12cd34-img_1.jpg" and first.declared_size == (200, 100)
    assert first.frame == "unit" and first.boxes[0].xyxy == pytest.approx((0.1, 0.2, 0.4, 0.6))
    assert second.image_ref == "img_2.jpg" and second.boxes == ()
    with pytest.raises(LabelError) as info:
        parse_labelstudio('[{"data": {"image": "a.jpg"}}, ')
    assert info.value.code == "bad_json"


def test_labelstudio_json_min_and_prediction_only_tasks():
    json_min = [
        {
            "image": "/data/upload/3/ab12cd34-img_1.jpg",
            "id": 4,
            "bbox": [
                {
                    "x": 10,
                    "y": 20,
                    "width": 30,
                    "height": 40,
                    "rectanglelabels": ["灰渣"],
                    "original_width": 200,
                    "original_height": 100,
                }
            ],
        },
        {"img": "s3://bucket/b/img_2.png", "id": 5},
    ]
    first, second = parse_labelstudio(json.dumps(json_min, ensure_ascii=False))
    assert first.image_ref == "ab12cd34-img_1.jpg" and first.declared_size == (200, 100)
    assert first.boxes[0].xyxy == pytest.approx((0.1, 0.2, 0.4, 0.6)) and first.boxes[0].label == "灰渣"
    assert (second.image_ref, second.boxes) == ("img_2.png", ())

    rectangle = {
        "type": "rectanglelabels",
        "value": {"x": 0, "y": 0, "width": 50, "height": 50, "rectanglelabels": ["a"]},
    }
    predicted = {"data": {"image": "p.jpg"}, "annotations": [], "predictions": [{"result": [rectangle]}]}
    cancelled = {**predicted, "annotations": [{"was_cancelled": True, "result": [rectangle]}]}
    annotated = {**predicted, "annotations": [{"result": []}]}
    tasks = json.dumps([predicted, cancelled, annotated])
    assert [(t.origin, len(t.boxes)) for t in parse_labelstudio(tasks)] == [
        ("predictions_only", 0),
        ("predictions_only", 0),
        ("annotation", 0),  # a human looked and drew nothing: no fallback to the model
    ]
    assert [(t.origin, len(t.boxes)) for t in parse_labelstudio(tasks, use_predictions=True)] == [
        ("prediction", 1),
        ("prediction", 1),
        ("annotation", 0),
    ]
    with pytest.raises(LabelError) as info:
        parse_labelstudio('[{"id": 1, "text": "no image here"}]')
    assert info.value.code == "bad_task"


def test_upload_prefix_and_class_name_mappings():
    assert strip_upload_prefix("3f2a9c1d-x.jpg") == "x.jpg"
    assert (
        strip_upload_prefix("batch-01.jpg") == "batch-01.jpg"
        and strip_upload_prefix("3f2a9c1dx.jpg") == "3f2a9c1dx.jpg"
    )
    shuffled = [10, 2, 0, 1, 9, 3, 8, 4, 7, 5, 6]
    names = "names:\n" + "".join(f"  '{k}': c{k}\n" for k in shuffled)  # string keys sort 0, 1, 10, 2…
    assert parse_class_names(names, is_yaml=True) == [f"c{k}" for k in range(11)]
    with pytest.raises(LabelError):
        parse_class_names("names: {0: a, 2: c}", is_yaml=True)


def test_format_detection_and_names():
    assert detect_format("\n# c\na.jpg;1,2,3,4;x") == "semicolon"
    assert detect_format("0 0.5 0.5 0.1 0.1") == "yolo"
    assert detect_format("  \n") == "empty"
    with pytest.raises(LabelError):
        detect_format("hello world")
    assert parse_label_text(b"", "auto").boxes == ()
    assert image_name("D:\\scan\\b1\\x.jpg") == "x.jpg"
    assert escapes_root("../../x.jpg") and escapes_root("a\\..\\..\\x.jpg") and not escapes_root("a..b.jpg")


# --- property: whatever the delimiter mixture, encoding and line ends, boxes come back exactly ---

coordinate = st.integers(min_value=0, max_value=99999)
box = st.tuples(coordinate, coordinate, coordinate, coordinate)
label = st.sampled_from(["灰渣", "条纹", "过熔", "铺粉不完全", "slag", "streak defect"])
column = st.sampled_from([";", "；", " ; ", "； ", " ；", ";;", " ；  ； "])
stray = st.sampled_from(["", ";", "；", " ; ", ";；", "；；； "])
inner = st.sampled_from(["；", ";", "，", ",", " ", "  ", "\t", " , ", "； "])
line_group = st.tuples(
    st.lists(box, min_size=1, max_size=4),
    label,
    column,
    column,
    st.lists(inner, min_size=16, max_size=16),
    stray,
    stray,
)


@settings(max_examples=300, deadline=None)
@given(
    groups=st.lists(line_group, min_size=1, max_size=6),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "gbk", "gb18030", "utf-16"]),
    newline=st.sampled_from(["\n", "\r\n"]),
    blank_lines=st.booleans(),
)
def test_property_boxes_round_trip(groups, encoding, newline, blank_lines):
    lines, expected = [], []
    for boxes, raw, first, last, delims, lead, trail in groups:
        numbers = [str(v) for b in boxes for v in b]
        field = numbers[0] + "".join(d + n for d, n in zip(delims, numbers[1:], strict=False))
        lines.append(f"{lead}img.jpg{first}{field}{last}{raw}{trail}")
        if blank_lines:
            lines.append("")
        expected += [(tuple(float(v) for v in b), raw) for b in boxes]
    data = (newline.join(lines) + newline).encode(encoding)
    labels = parse_label_text(data, "auto")
    assert labels.format == "semicolon"
    assert [(b.xyxy, b.label) for b in labels.boxes] == expected
