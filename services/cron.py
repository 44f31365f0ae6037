"""Crontab lines read as cron reads them (and Kubernetes, for the lines both accept), for APScheduler.

APScheduler 3 numbers the days of the week from Monday (0 = mon), cron from Sunday (0 and 7 = sun), and its
``CronTrigger.from_crontab`` hands the weekday field over unchanged: ``RETRAIN_CRON="0 3 * * 1"`` fired on
Tuesdays in the scheduler while the CronJob with the same line ran on Mondays. The field is translated into day
names here. Cron also fires when *either* the day of the month or the weekday matches, where both are
restricted, and APScheduler only when both do: such a line is refused rather than read another way.
"""

from __future__ import annotations

from apscheduler.triggers.cron import CronTrigger

DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # cron's numbers: 0 (and 7) is Sunday


def crontab_trigger(line: str, timezone: str = "UTC") -> CronTrigger:
    """The trigger of a five-field crontab line (minute hour day-of-month month weekday), as cron fires it."""
    fields = line.split()
    if len(fields) != 5:
        raise ValueError(f"{line!r}: a crontab line has five fields: minute hour day-of-month month weekday")
    minute, hour, day, month, weekday = fields
    if day != "*" and weekday != "*":
        raise ValueError(
            f"{line!r}: restrict the day of the month or the weekday, not both (cron fires on either, "
            "this scheduler would fire only on both)"
        )
    return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=weekdays(weekday), timezone=timezone)


def weekdays(field: str) -> str:
    """A crontab weekday field (``1-5``, ``0,6``, ``*/2``, ``mon-fri``, ``7``) as APScheduler's day names."""
    if field == "*":
        return "*"
    days: set[int] = set()
    for part in field.lower().split(","):
        span, slash, step = part.partition("/")
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            first, last = (_day(end, field) for end in span.split("-", 1))
        else:
            first = _day(span, field)
            last = 6 if slash else first  # "2/3": from Tuesday, every third day of the week
        every = _number(step, field) if slash else 1
        if last < first or every < 1:
            raise ValueError(f"weekday field {field!r}: {part!r} is not a range cron reads")
        days.update(d % 7 for d in range(first, last + 1, every))
    return ",".join(DAYS[d] for d in sorted(days))


def _day(token: str, field: str) -> int:
    if token in DAYS:
        return DAYS.index(token)
    day = _number(token, field)
    if not 0 <= day <= 7:
        raise ValueError(f"weekday field {field!r}: {token!r} is not a day (0–7, 0 and 7 Sunday, or sun–sat)")
    return day


def _number(token: str, field: str) -> int:
    if not token.isdigit():
        raise ValueError(f"weekday field {field!r}: {token!r} is not a number or a day's name")
    return int(token)
