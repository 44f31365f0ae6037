"""``coilguard simulate`` and ``coilguard dataset``: the options, and a simulated gateway's position across runs."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from ml.dataset import CoilDataset
from services.cli import cli
from services.cli.line import _simulator
from services.line import CounterError, LineCounter, LinePosition


def test_a_line_without_a_counter_file_starts_at_its_first_coil(tmp_path: Path) -> None:
    assert LinePosition.read(tmp_path / "galv-1.json") == LinePosition(0, None)


def test_the_position_survives_a_write_and_a_read(tmp_path: Path) -> None:
    path = tmp_path / "galv-1.json"
    kept = LinePosition(41, datetime(2026, 3, 2, 7, 15, tzinfo=UTC))
    kept.write(path)
    assert LinePosition.read(path) == kept
    assert [p.name for p in path.parent.iterdir()] == ["galv-1.json"]  # nothing left beside it


def test_a_counter_keeps_each_coil_before_it_is_handed_over(tmp_path: Path) -> None:
    """Killed between the two, a run loses that coil; it never leaves its id to the next run, whose coil of that
    number would carry other readings (no previous coil to follow) and be refused as a reused id."""
    path = tmp_path / "sim" / "galv-1.json"  # the folder is made by the first run
    with LineCounter(path) as counter:
        assert counter.start == LinePosition(0, None)
        coils = counter.counted(_simulator(3, "galv-1", None, None, 200, 1.0, "C").stream())
        first = next(coils)
        assert LinePosition.read(path) == LinePosition(1, first.produced_at)
        second = next(coils)
        assert LinePosition.read(path) == LinePosition(2, second.produced_at)
    assert sorted(p.name for p in path.parent.iterdir()) == [".galv-1.json.lock", "galv-1.json"]


def test_a_second_run_on_the_same_counter_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "galv-1.json"
    with LineCounter(path), pytest.raises(CounterError, match=r"another run holds .*galv-1\.json: two runs would"):
        LineCounter(path).__enter__()
    with LineCounter(path):  # free again once the first run ended
        pass


def test_a_counter_that_cannot_be_kept_is_said_before_any_coil(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    with pytest.raises(CounterError, match="cannot keep the line's position in"):
        LineCounter(tmp_path / "not-a-folder" / "galv-1.json").__enter__()
    (tmp_path / "bad.json").write_text("12")
    with pytest.raises(CounterError, match="does not hold a line's position"):
        LineCounter(tmp_path / "bad.json").__enter__()


def test_a_drift_asked_for_a_resumed_run_starts_at_its_first_coil() -> None:
    """`--drift-at` left out: the drift ramps up from the first coil this run sends, not from coil 0 of the line
    (which a run resumed at coil 5000 would start at full strength)."""
    position = LinePosition(5000, datetime(2026, 3, 2, 7, 15, tzinfo=UTC))
    sim = _simulator(3, "galv-1", "knife-wear", None, 200, 1.0, "C", position)
    levels = [coil.drift_level for coil in itertools.islice(sim.stream(), 101)]
    assert levels[0] == 0.0 and levels[100] == pytest.approx(0.5)
    at = _simulator(3, "galv-1", "knife-wear", 4900, 200, 1.0, "C", position)  # given: the line's own index
    assert next(at.stream()).drift_level == pytest.approx(0.5)


@pytest.mark.parametrize(
    "text",
    ["", "12", '{"coils": -1, "clock": null}', '{"coils": 3, "clock": "2026-03-02T07:15:00"}', '{"clock": null}'],
)
def test_a_file_that_holds_no_position_is_refused_by_name(tmp_path: Path, text: str) -> None:
    path = tmp_path / "galv-1.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"galv-1\.json does not hold a line's position"):
        LinePosition.read(path)


def test_a_line_that_goes_on_sends_new_ids_in_order_of_time() -> None:
    """What a second run sends after a first one of three coils: coil 4 on, never an id of the first run."""
    first = list(itertools.islice(_simulator(3, "galv-1", None, None, 200, 1.0, "C").stream(), 3))
    position = LinePosition(first[-1].index + 1, first[-1].produced_at)
    later = list(itertools.islice(_simulator(3, "galv-1", None, None, 200, 1.0, "C", position).stream(), 2))
    assert [c.coil_id for c in first + later] == [f"C-2026-00000{i}" for i in range(1, 6)]
    assert first[-1].produced_at < later[0].produced_at


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--line", "galv/1"], "Invalid value for '--line': 1–64 characters, none of them / + #"),
        (["--line", "galv-1\n"], "Invalid value for '--line'"),
        (["--id-prefix", "C/1"], "id_prefix must be 1–40 characters of [A-Za-z0-9._-]"),
        (["--severity", "-1", "--drift", "knife-wear"], "severity"),
    ],
)
def test_an_option_the_line_cannot_take_is_a_usage_error_not_a_traceback(
    tmp_path: Path, args: list[str], reason: str
) -> None:
    result = CliRunner().invoke(cli, ["dataset", "--coils", "1", "--out", str(tmp_path / "d.npz"), *args])
    assert result.exit_code == 2, result.output
    assert reason in result.output and "Traceback" not in result.output
    assert not (tmp_path / "d.npz").exists()


def test_a_line_named_as_the_coil_message_allows_is_simulated(tmp_path: Path) -> None:
    """DESIGN §3 restricts the coil id, not the line: AssessCoils takes `Linie-Ä`, and so does the simulator."""
    out = tmp_path / "d.npz"
    result = CliRunner().invoke(cli, ["dataset", "--coils", "2", "--out", str(out), "--line", "Linie-Ä"])
    assert result.exit_code == 0, result.output
    assert CoilDataset.load(out).meta["line"] == "Linie-Ä"
