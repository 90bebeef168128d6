"""The service map's layout: two columns, so that labels stay readable at 50 identities.

Identities that mostly open connections sit in the left column and those that mostly
receive them in the right one (half each, so the map stays compact). Node labels sit
outside the columns (left of the left column, right of the right one), one per row,
and every edge stays between the columns: a straight line from one column to the
other, a curve bulging inwards within a column. So no edge crosses a node label and no
two node labels overlap, whatever the graph; tests/webui/test_webui_browser_scale.py
checks it from the rendered geometry.
"""
from __future__ import annotations

import math

WIDTH = 900
LEFT_X, RIGHT_X = 300, 600
ROW = 28             # vertical distance of two nodes of a column (labels are 13 units high)
MARGIN = 48
NODE_R = 9
LABEL_GAP = 6        # between a node's circle and its label
MAX_LABEL = 38       # characters shown; the full name is in the node's tooltip
EDGE_TEXT_MAX = 12   # edges with a drawn ports label; above that, ports only in the tooltip
SIDE_BY_SIDE = {"FORWARDED": -3, "DROPPED": 3, "AUDIT": 0}


def layout(nodes: dict[str, dict], edges: list[dict]) -> dict:
    """Place ``nodes`` ({name: {"out", "in", ...}}) and shape ``edges`` ({"from", "to",
    "verdict", ...}); both are updated in place. Returns width and height."""
    def initiative(name: str) -> tuple:
        n = nodes[name]
        return (-(n["out"] - n["in"]) / max(1, n["out"] + n["in"]), name)
    ranked = sorted(nodes, key=initiative)
    half = -(-len(ranked) // 2)
    columns = (sorted(ranked[:half]), sorted(ranked[half:]))
    rows = max(len(c) for c in columns) if nodes else 1
    height = max(240, rows * ROW + 2 * MARGIN)
    for side, names in enumerate(columns):
        step = (height - 2 * MARGIN) / max(len(names), 1)
        for i, name in enumerate(names):
            n = nodes[name]
            left = side == 0
            n.update(x=LEFT_X if left else RIGHT_X, y=round(MARGIN + (i + 0.5) * step, 1),
                     side="left" if left else "right", r=NODE_R,
                     label=name if len(name) <= MAX_LABEL else name[:MAX_LABEL - 1] + "…")
            gap = NODE_R + LABEL_GAP
            n.update(lx=n["x"] - gap if left else n["x"] + gap, ly=round(n["y"] + 4.5, 1),
                     anchor="end" if left else "start")
    for e in edges:
        _shape(e, nodes[e["from"]], nodes[e["to"]], show_text=len(edges) <= EDGE_TEXT_MAX)
    return {"width": WIDTH, "height": round(height)}


def _shape(e: dict, a: dict, b: dict, show_text: bool) -> None:
    """The edge's SVG path ``d`` and its label position (``lx``, ``ly``), kept between
    the columns."""
    off = SIDE_BY_SIDE.get(e["verdict"], 0)
    inward = 1 if a["side"] == "left" else -1
    if a is b:  # a loop on the inner side of the node
        x, y = a["x"] + inward * NODE_R, a["y"] + off
        d = f"M{x},{y - 4} c{inward * 34},-22 {inward * 34},30 0,8"
        e.update(d=d, lx=None, ly=None, self_loop=True)
        return
    if a["side"] != b["side"]:
        dx, dy = b["x"] - a["x"], b["y"] - a["y"]
        dist = math.hypot(dx, dy) or 1
        ox, oy = -dy / dist * off, dx / dist * off
        sx, sy = dx / dist * (NODE_R + 2), dy / dist * (NODE_R + 2)
        x1, y1, x2, y2 = a["x"] + sx + ox, a["y"] + sy + oy, b["x"] - sx + ox, b["y"] - sy + oy
        d = f"M{x1:.1f},{y1:.1f} L{x2:.1f},{y2:.1f}"
        lx, ly, anchor = (x1 + x2) / 2, (y1 + y2) / 2 - 4, "middle"
    else:  # same column: a curve into the space between the columns
        bulge = inward * min(RIGHT_X - LEFT_X - 40, 60 + abs(b["y"] - a["y"]) * 0.5) + inward * off
        cx, cy = a["x"] + bulge, (a["y"] + b["y"]) / 2
        x1, y1 = _towards(a, cx, cy)
        x2, y2 = _towards(b, cx, cy)
        d = f"M{x1:.1f},{y1:.1f} Q{cx:.1f},{cy:.1f} {x2:.1f},{y2:.1f}"
        lx, ly = (x1 + 2 * cx + x2) / 4, cy - 4   # the curve's apex, text inwards from it
        anchor = "start" if inward > 0 else "end"
    e.update(d=d, lx=round(lx, 1) if show_text else None, ly=round(ly, 1) if show_text else None,
             anchor=anchor, self_loop=False)


def _towards(n: dict, x: float, y: float) -> tuple[float, float]:
    """The point of ``n``'s circle (plus 2) facing (x, y)."""
    dx, dy = x - n["x"], y - n["y"]
    dist = math.hypot(dx, dy) or 1
    return n["x"] + dx / dist * (NODE_R + 2), n["y"] + dy / dist * (NODE_R + 2)
