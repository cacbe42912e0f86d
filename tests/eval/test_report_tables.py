"""The evaluation tables: single experts listed by quality and cost (never as an AUDC of 0)."""

from __future__ import annotations

from test_evaluate import fit_all, random_table

from cscr.eval import evaluate_routers
from cscr.eval.report import experts_table, format_table, report_markdown
from cscr.markdown import num


def test_single_experts_are_listed_by_quality_and_cost_not_audc():
    table, emb = random_table(120, 4, 3)
    res = evaluate_routers(fit_all(table, emb), table, emb, table.split_index("test"))
    text = format_table(res)
    routers, singles = text.split("single experts (one operating point each")
    assert "single:" not in routers and "oracle" in routers and "AUDC" in routers
    assert "no AUDC" in singles
    priciest = int(res.expert_cost.argmax())
    line = next(ln for ln in singles.splitlines() if ln.startswith(f"single:{res.expert_names[priciest]} "))
    assert line.split()[1:] == [num(float(res.expert_quality[priciest])), num(float(res.expert_cost[priciest]), ".4g")]
    md = format_table(res, markdown=True)
    assert "single:" not in md
    ex = experts_table(res)
    assert ex.splitlines()[0] == "| expert | mean quality | mean cost (usd) |" and "AUDC" not in ex
    assert f"| {res.best_expert} (best) |" in ex
    assert report_markdown(res).count("## Single experts") == 1
