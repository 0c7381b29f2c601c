"""Rich renderings of the KV memory: pool totals, per-slot pages, a page map.

Everything here takes plain data (LLMEngine.memory_snapshot(), or the JSON `glake serve` returns at
/v1/memory), so the same views serve `glake inspect-memory` (local or --url), the chat's /memory and
its live panel.
"""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

MAPPED, SHARED, QUEUED, RESERVED = "█", "▓", "▒", "·"
MAP_WIDTH = 48


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def pool_table(pool: dict, engine: dict | None = None) -> Table:
    ps = pool["page_size"]
    t = Table(title=f"KV page pool ({pool['backend']}, {human_bytes(ps)} pages)", title_justify="left")
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


def counters_line(pool: dict, engine: dict | None = None) -> Text:
    parts = [
        f"{pool['num_vtensors']} vTensors reserve {human_bytes(pool['reserved_bytes'])} of address space",
        f"mapped {pool['pages_mapped']} · unmapped {pool['pages_unmapped']} · aliased {pool['pages_aliased']} pages",
        f"async jobs {pool['async_jobs']} ({pool['async_pages']} pages)",
    ]
    if engine:
        parts.append(f"mapping waits {engine.get('mapping_waits', 0)} · preemptions {engine.get('preemptions', 0)}"
                     f" · running {engine.get('running', 0)} · waiting {engine.get('waiting', 0)}")
        pc = engine.get("prefix_cache")
        if pc:
            parts.append(f"prefix cache: {pc['entries']} entries ({pc['cached_pages']} pages, {pc['tokens_per_page']} "
                         f"tokens each) · {pc['hit_tokens']} tokens reused over {pc['lookups']} lookups · "
                         f"{pc['evicted']} evicted")
        if engine.get("kv_max_pages"):
            parts.append(f"pool limit {engine['kv_max_pages']} pages ({human_bytes(engine['kv_max_pages'] * pool['page_size'])})")
    return Text("\n".join(parts), style="dim")


def slot_table(slots: list[dict], page_size: int, show_idle: bool = True) -> Table:
    t = Table(title="Slots (one contiguous virtual range per request)", title_justify="left")
    for col in ("slot", "request", "tokens", "pages mapped / reserved", "queued", "mapped memory", "waste"):
        t.add_column(col, justify="left" if col in ("request",) else "right")
    for s in slots:
        if s.get("internal") or (not s["mapped_pages"] and not s["owner"] and not s["queued_pages"]):
            continue  # the anchor slot, or never used: nothing to show
        if not show_idle and s["owner"] is None:
            continue
        t.add_row(
            str(s["slot"]),
            s["owner"] or "[dim]idle, pages kept[/dim]",
            str(s["tokens"]),
            f"{s['mapped_pages']} / {s['reserved_pages']}",
            str(s["queued_pages"]),
            human_bytes(s["mapped_pages"] * page_size),
            human_bytes(s["waste_bytes"]),
        )
    return t


def page_map_row(s: dict, width: int = MAP_WIDTH) -> Text:
    """One cell per page of the slot's range (or per run of pages when there are more than
    `width`): mapped, shared with another slot, queued on the worker, or reserved only."""
    n = s["reserved_pages"]
    mapped, queued, shared = s["mapped_pages"], s["queued_pages"], s.get("shared_pages", 0)
    per_cell = max(1, -(-n // width))
    text = Text()
    for start in range(0, n, per_cell):
        if start < shared:
            text.append(SHARED, style="magenta")
        elif start < mapped:
            text.append(MAPPED, style="green")
        elif start < mapped + queued:
            text.append(QUEUED, style="yellow")
        else:
            text.append(RESERVED, style="dim")
    if per_cell > 1:
        text.append(f" {per_cell}/cell", style="dim")
    return text


def page_map(slots: list[dict], width: int = MAP_WIDTH) -> Table:
    t = Table(title="Page map (per slot, all its vTensors)", title_justify="left", show_header=False, box=None)
    t.add_column("slot", style="bold", justify="right")
    t.add_column("pages")
    for s in slots:
        if not s.get("internal") and (s["mapped_pages"] or s["owner"] or s["queued_pages"]):
            t.add_row(f"{s['slot']}", page_map_row(s, width))
    t.caption = f"{MAPPED} mapped  {SHARED} shared  {QUEUED} queued on the worker  {RESERVED} reserved"
    return t


def rank_table(ranks: list[dict]) -> Table:
    """Tensor parallelism: one pool per rank (each holds its KV heads), plus the totals."""
    t = Table(title="KV pools per rank (each holds the rank's KV heads; every rank maps the same pages)",
              title_justify="left")
    for col in ("rank", "device", "total", "used", "free", "shared", "memory used / total"):
        t.add_column(col, justify="left" if col == "device" else "right")
    for r in ranks:
        ps = r["page_size"]
        t.add_row(str(r["rank"]), r["device"], str(r["total_pages"]), str(r["used_pages"]), str(r["free_pages"]),
                  str(r["shared_pages"]), f"{human_bytes(r['used_pages'] * ps)} / {human_bytes(r['total_pages'] * ps)}")
    used = sum(r["used_pages"] * r["page_size"] for r in ranks)
    total = sum(r["total_pages"] * r["page_size"] for r in ranks)
    t.add_row("all", "", *(str(sum(r[k] for r in ranks)) for k in ("total_pages", "used_pages", "free_pages",
                                                                    "shared_pages")),
              f"{human_bytes(used)} / {human_bytes(total)}", style="bold")
    return t


def render_snapshot(snap: dict) -> Group:
    pool, slots = snap["pool"], snap.get("slots", [])
    engine = snap.get("engine")
    parts = []
    if engine:
        parts.append(Text(f"{engine['model']} · {engine['device']} · {engine['dtype']} · KV layout "
                          f"{engine['kv_layout']} ({engine['tokens_per_page']} tokens a page per vTensor)",
                          style="bold"))
    parts += [pool_table(pool), counters_line(pool, engine)]
    if engine and engine.get("rank_pools"):
        parts += [Text(""), rank_table(engine["rank_pools"])]
    if slots:
        parts += [Text(""), slot_table(slots, pool["page_size"]), Text(""), page_map(slots)]
    return Group(*parts)


def live_panel(snap: dict) -> Panel:
    """The compact view the chat shows while a reply streams."""
    pool, slots = snap["pool"], snap.get("slots", [])
    used, total = pool["used_pages"], pool["total_pages"] or 1
    bar_width = 30
    filled = round(bar_width * used / total)
    lines = Text()
    lines.append("pool ")
    lines.append("█" * filled, style="green")
    lines.append("·" * (bar_width - filled), style="dim")
    lines.append(f" {used}/{total} pages ({human_bytes(used * pool['page_size'])})\n")
    ranks = (snap.get("engine") or {}).get("rank_pools")
    if ranks:
        lines.append(" · ".join(f"rank {r['rank']} {r['used_pages']}/{r['total_pages']}" for r in ranks) + "\n",
                     style="dim")
    for s in slots:
        if not s.get("internal") and (s["owner"] or s["mapped_pages"]):
            who = s["owner"] or "idle"
            lines.append(f"slot {s['slot']:>2} {who[:14]:<14} ")
            lines.append_text(page_map_row(s, 32))
            lines.append(f" {s['mapped_pages']}/{s['reserved_pages']} mapped, {s['tokens']} tok\n")
    return Panel(lines, title="KV memory (vTensors)", title_align="left", border_style="blue")
