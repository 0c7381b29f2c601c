"""Rich renderings of the allocator's state: pool totals, per-vTensor pages, and a page map.

Everything here takes a plain snapshot dict (PagePool.snapshot(), or the JSON a server returns), so
the same views serve `glake inspect-memory`, the chat's /memory and live panel, and `--url`.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

MAPPED, SHARED, RESERVED = "█", "▓", "·"
MAP_WIDTH = 64


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def pool_table(pool: dict) -> Table:
    ps = pool["page_size"]
    t = Table(title=f"Page pool ({pool['backend']}, device {pool['device']})", title_justify="left")
    t.add_column("pages", justify="right")
    t.add_column("count", justify="right")
    t.add_column("memory", justify="right")
    total = pool["total_pages"] or 1
    for label, key in (("total", "total_pages"), ("used", "used_pages"), ("free", "free_pages"),
                       ("shared (aliased)", "shared_pages")):
        n = pool[key]
        pct = f" ({100 * n / total:.0f}%)" if key != "total_pages" else ""
        t.add_row(label, f"{n}{pct}", human_bytes(n * ps))
    return t


def pool_summary(pool: dict) -> Text:
    return Text(
        f"page size {human_bytes(pool['page_size'])} · {pool['num_vtensors']} vTensors reserving "
        f"{human_bytes(pool['reserved_bytes'])} · mapped {pool['pages_mapped']} / unmapped "
        f"{pool['pages_unmapped']} / aliased {pool['pages_aliased']} pages · set-access calls "
        f"{pool['set_access_calls']} · async jobs {pool['async_jobs']} · waits {pool['waits']}",
        style="dim",
    )


def vtensor_table(vtensors: list[dict], page_size: int, title: str = "vTensors") -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("name", "reserved", "pages mapped / reserved", "mapped memory", "shared", "pending"):
        t.add_column(col, justify="left" if col == "name" else "right")
    for vt in vtensors:
        mapped = len(vt["mapped_pages"])
        t.add_row(
            vt["name"],
            human_bytes(vt["reserved_bytes"]),
            f"{mapped} / {vt['num_pages']}",
            human_bytes(mapped * page_size),
            str(vt["shared_pages"]),
            str(vt["pending_jobs"]),
        )
    return t


def page_map_row(vt: dict, shared: set[int], width: int = MAP_WIDTH) -> Text:
    """One cell per page (or per run of pages when there are more than `width`): mapped, mapped and
    shared with another vTensor, or reserved only."""
    n = vt["num_pages"]
    per_cell = max(1, -(-n // width))  # ceil(n / width) pages per cell
    mapped = dict(zip(vt["mapped_pages"], vt["physical_pages"]))
    text = Text()
    for start in range(0, n, per_cell):
        cell = [mapped.get(p) for p in range(start, min(n, start + per_cell))]
        if any(phys is not None and phys in shared for phys in cell):
            text.append(SHARED, style="magenta")
        elif any(phys is not None for phys in cell):
            text.append(MAPPED, style="green")
        else:
            text.append(RESERVED, style="dim")
    if per_cell > 1:
        text.append(f"  ({per_cell} pages/cell)", style="dim")
    return text


def page_map(vtensors: list[dict], width: int = MAP_WIDTH) -> Table:
    seen: dict[int, int] = {}
    for vt in vtensors:
        for phys in vt["physical_pages"]:
            seen[phys] = seen.get(phys, 0) + 1
    shared = {p for p, n in seen.items() if n > 1}
    t = Table(title="Page map", title_justify="left", show_header=False, box=None, pad_edge=False)
    t.add_column("name", style="bold")
    t.add_column("pages")
    for vt in vtensors:
        t.add_row(vt["name"], page_map_row(vt, shared, width))
    t.caption = f"{MAPPED} mapped   {SHARED} shared with another vTensor   {RESERVED} reserved, unmapped"
    return t


def render_snapshot(snapshot: dict) -> Group:
    pool = snapshot["pool"]
    vts = snapshot["vtensors"]
    parts = [pool_table(pool), pool_summary(pool)]
    if vts:
        parts += [Text(""), vtensor_table(vts, pool["page_size"]), Text(""), page_map(vts)]
    return Group(*parts)
