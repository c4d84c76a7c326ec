#!/usr/bin/env python3
"""Expected cron fires around every UTC-offset change of every zone named on
stdin (one per line), 2011-2030, computed with Python's zoneinfo: an
implementation of the daylight-saving policies independent of cronguard's
(chrono-tz and croner). Standard library only.

The policies (docs/scheduling.md): a wall time that occurs once fires once;
a repeated wall time fires at its first pass (`fold: first`) or at both
(`fold: both`); a missing wall time fires once at the instant the gap ends
(`gap: shift`) or not at all (`gap: skip`).

Prints JSON: {"tzdb": version, "transitions": [...], "cases": [...]}, every
instant in Unix seconds. Transitions with the same local shape (wall time,
offset before and after) are checked once, in the first zone that has them;
every zone's transitions are listed, for the caller to check its own zone
data against.
"""

import json
import sys
import zoneinfo
from datetime import datetime, timedelta, timezone

UTC = timezone.utc
START = datetime(2011, 1, 1, tzinfo=UTC)
END = datetime(2031, 1, 1, tzinfo=UTC)
# Instants checked either side of a change.
WINDOW = timedelta(hours=6)

EXPRESSIONS = [
    "30 2 * * *",
    "0 0 * * *",
    "30 1 * * *",
    "0 * * * *",
    "*/30 * * * *",
    "*/15 * * * *",
    "45 * * * *",
    "30 2 * * 0",
    "15 0 * * 1-5",
    "0 */30 * * * *",
]
POLICIES = [(f, g) for f in ("first", "both") for g in ("shift", "skip")]


def field(spec, lo, hi):
    """The set of values a cron field admits."""
    values = set()
    for part in spec.split(","):
        step = 1
        if "/" in part:
            part, step = part.split("/")
            step = int(step)
        if part == "*":
            a, b = lo, hi
        elif "-" in part:
            a, b = map(int, part.split("-"))
        else:
            a = b = int(part)
        values.update(range(a, b + 1, step))
    return values


def matcher(expr):
    parts = expr.split()
    if len(parts) == 5:
        parts = ["0"] + parts
    sec, minute, hour, dom, month, dow = parts
    sets = (
        field(sec, 0, 59),
        field(minute, 0, 59),
        field(hour, 0, 23),
        field(dom, 1, 31),
        field(month, 1, 12),
        field(dow, 0, 6),
    )
    assert dom == "*" or dow == "*", "one day field at a time"
    # Wall times are walked in quarter hours (see `walls`).
    assert sets[0] == {0} and sets[1] <= {0, 15, 30, 45}, expr

    def matches(w):
        return (
            w.second in sets[0]
            and w.minute in sets[1]
            and w.hour in sets[2]
            and w.day in sets[3]
            and w.month in sets[4]
            and (w.weekday() + 1) % 7 in sets[5]
        )

    return matches


def offset(zone, t):
    return t.astimezone(zone).utcoffset()


def transitions(zone):
    """(instant, offset before, offset after) of each change in [START, END):
    weeks whose ends differ are searched day by day, then to the second (a
    change and its reversal within one week would be missed; the database
    has none in these years)."""
    found = []
    week, day = timedelta(days=7), timedelta(days=1)
    t = START
    before = offset(zone, t)
    while t < END:
        if offset(zone, t + week) == before:
            t += week
            continue
        for d in range(7):
            lo, hi = t + d * day, t + (d + 1) * day
            if offset(zone, hi) == offset(zone, lo):
                continue
            while hi - lo > timedelta(seconds=1):
                mid = (lo + (hi - lo) / 2).replace(microsecond=0)
                if offset(zone, mid) == offset(zone, lo):
                    lo = mid
                else:
                    hi = mid
            found.append((hi, offset(zone, lo), offset(zone, hi)))
        t += week
        before = offset(zone, t)
    return [c for c in found if c[0] < END]


def mapped(zone, wall):
    """The instants wall time `wall` stands for: one, two (a fold, earliest
    first), or none (a gap)."""
    candidates = {
        wall.replace(tzinfo=zone, fold=f).astimezone(UTC) for f in (0, 1)
    }
    return sorted(
        u for u in candidates if u.astimezone(zone).replace(tzinfo=None) == wall
    )


def walls(zone, change, before, after):
    """Every quarter-hour wall time whose instants may fall in the window,
    mapped (every expression fires on quarter hours only)."""
    lo, hi = change - WINDOW, change + WINDOW
    w = (lo + min(before, after)).replace(tzinfo=None) - timedelta(minutes=15)
    w = w.replace(minute=w.minute - w.minute % 15, second=0)
    last = (hi + max(before, after)).replace(tzinfo=None) + timedelta(minutes=15)
    out = []
    while w <= last:
        out.append((w, mapped(zone, w)))
        w += timedelta(minutes=15)
    return out


def expected(change, matched, fold, gap):
    lo, hi = change - WINDOW, change + WINDOW
    fires = set()
    for at in matched:
        if not at:
            if gap == "shift":
                fires.add(change)
        elif fold == "both":
            fires.update(at)
        else:
            fires.add(at[0])
    return sorted(int(f.timestamp()) for f in fires if lo < f <= hi)


def main():
    names = [n.strip() for n in sys.stdin if n.strip()]
    matchers = {e: matcher(e) for e in EXPRESSIONS}
    listed, cases, shapes = [], [], set()
    for name in names:
        try:
            zone = zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            listed.append({"zone": name, "missing": True})
            continue
        for change, before, after in transitions(zone):
            listed.append({
                "zone": name,
                "at": int(change.timestamp()),
                "before": int(before.total_seconds()),
                "after": int(after.total_seconds()),
            })
            shape = ((change + before).replace(tzinfo=None), before, after)
            if shape in shapes:
                continue
            shapes.add(shape)
            table = walls(zone, change, before, after)
            for expr, matches in matchers.items():
                matched = [at for wall, at in table if matches(wall)]
                for fold, gap in POLICIES:
                    cases.append({
                        "zone": name,
                        "expr": expr,
                        "fold": fold,
                        "gap": gap,
                        "from": int((change - WINDOW).timestamp()),
                        "until": int((change + WINDOW).timestamp()),
                        "fires": expected(change, matched, fold, gap),
                    })
    version = None
    for path in zoneinfo.TZPATH:
        try:
            with open(f"{path}/tzdata.zi") as f:
                version = f.readline().split()[-1]
                break
        except OSError:
            pass
    sys.stdout.write(json.dumps({"tzdb": version, "transitions": listed, "cases": cases}))


if __name__ == "__main__":
    main()
