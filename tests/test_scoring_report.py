"""Result tables and the A/B plot."""

from PIL import Image

from vlsae_guard.scoring import report


def rows():
    comparison = {
        "ci_a": {"f1": (80.0, 84.0), "accuracy": (81.0, 85.0)},
        "ci_b": {"f1": (82.0, 86.0), "accuracy": (82.0, 86.0)},
        "delta": {"f1": 2.0, "accuracy": 1.0},
        "ci_delta": {"f1": (0.5, 3.5), "accuracy": (-0.2, 2.2)},
    }
    arms = {"none": {"f1": 82.0, "accuracy": 83.0}, "vcd": {"f1": 84.0, "accuracy": 84.0}}
    return report.rows_from_comparison("coco/random", arms, comparison, ["accuracy", "f1"], p=0.03)


def test_tables_show_both_arms_the_difference_and_p():
    text = report.text_table(rows())
    assert "none" in text and "vcd" in text and "delta (vcd - none)" in text
    assert "McNemar p" in text
    assert "[-0.2, +2.2]" in text and "+2.0" in text and "0.03" in text
    md = report.markdown_table(rows()).splitlines()
    assert md[0].startswith("| split | metric | none | vcd | delta (vcd - none) |")
    assert md[1] == "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
    assert len(md) == 4


def test_single_arm_table_has_no_difference_column():
    only = report.rows_from_comparison("", {"none": {"f1": 80.0}}, None, ["f1"])
    text = report.text_table(only)
    assert "delta" not in text and "80.0" in text


def test_plot_writes_a_valid_png(tmp_path):
    path = report.plot(rows(), tmp_path / "ab.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"
