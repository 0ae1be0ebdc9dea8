"""The run's results: final-epoch and validation-selected test accuracy, per peer and for the ensemble.

Validation selection picks, for each peer (and the ensemble) separately, the epoch with its best
validation top-1 (the latest among ties: the most-trained of equals) and reports that epoch's test top-1.
Test never selects anything.
"""

from __future__ import annotations


def select(history: list[dict], names: list[str]) -> dict:
    """Per model (peers, then 'ensemble'): final test top-1 and the val-selected test top-1 and epoch."""
    last = history[-1]
    rows = {}
    for p, name in enumerate(names + ["ensemble"]):
        def acc(h, split, p=p, name=name):
            m = h[split]
            return m["ensemble_top1"] if name == "ensemble" else m["top1"][p]

        row = {"final_test_top1": acc(last, "test"), "val_selected_test_top1": None, "selected_epoch": None}
        with_val = [h for h in history if h.get("val")]
        if with_val:
            best = max(with_val, key=lambda h: (acc(h, "val"), h["epoch"]))
            row.update(val_selected_test_top1=acc(best, "test"), selected_epoch=best["epoch"],
                       val_top1=acc(best, "val"))
        rows[name] = row
    return rows


def table(summary: dict) -> str:
    """A fixed-width table of the summary for the terminal."""
    head = f"{'model':<14}{'arch':<22}{'params':>9}  {'final test':>10}  {'val-selected test (epoch)':>26}"
    lines = [head, "-" * len(head)]
    for r in summary["peers"] + [summary["ensemble"]]:
        sel = "n/a (val_split=0)" if r["val_selected_test_top1"] is None else \
            f"{r['val_selected_test_top1']:.2f} (e{r['selected_epoch']})"
        params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else ""
        lines.append(f"{r['name']:<14}{r.get('arch', ''):<22}{params:>9}  {r['final_test_top1']:>10.2f}  {sel:>26}")
    lines.append(f"test top-1 %, {summary['epochs']} epochs, {summary['wall_time_s']:.0f} s wall")
    return "\n".join(lines)
