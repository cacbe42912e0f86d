"""The one table/number formatter every report uses."""

from __future__ import annotations

import math

import pytest

from cscr.markdown import markdown_table, num, text_table


def test_num_formats_missing_and_special_values():
    assert num(0.123456) == "0.1235"
    assert num(1234.5, ".4g") == "1234" and num(0.00012345, ".3g") == "0.000123"
    assert num(None) == "—" and num(None, none="not reached") == "not reached"
    assert num(math.nan) == "—" and num(math.inf) == "—"
    assert num(3, ".4f") == "3.0000" and num("cscr") == "cscr" and num(True) == "True"


def test_markdown_table_alignment_and_escaping():
    md = markdown_table(["router", "AUDC"], [["a|b", num(0.5)], ["knn", num(0.25)]])
    assert md.splitlines() == ["| router | AUDC |", "|---|---:|", "| a\\|b | 0.5000 |", "| knn | 0.2500 |"]
    assert markdown_table(["x", "y"], [[1, 2]], "rl").splitlines()[1] == "|---:|---|"


def test_table_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"row \['a'\] has 1 cells, the table has 2 columns"):
        markdown_table(["x", "y"], [["a"]])
    with pytest.raises(ValueError, match=r"align 'l' must be one l or r per column \(2 columns\)"):
        markdown_table(["x", "y"], [], "l")


def test_text_table_pads_columns():
    lines = text_table(["router", "AUDC"], [["oracle", "0.9750"], ["knn", "0.8"]]).splitlines()
    assert lines == ["router    AUDC", "------  ------", "oracle  0.9750", "knn        0.8"]
