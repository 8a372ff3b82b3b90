"""The bench reads wrk's and pgbench's reports right and judges the goals from them, and
stops what it started.

Fast and self-contained (no server, no wrk needed): `make test` runs it with the rest.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pytest

from bench import clients, compare, goals, pgbench, profile, report, wrk
from bench import run as run_module
from bench.backends import Peak
from bench.cpu import CpuUse
from bench.results import Cell, Run
from bench.servers import ROOT
from bench.workloads import WORKLOADS

CLEAN = """\
Running 15s test @ http://127.0.0.1:8000/users/
  2 threads and 500 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   350.12ms   40.00ms   1.20s    90.00%
    Req/Sec   720.50    100.00     1.00k    70.00%
  Latency Distribution
     50%  340.00ms
     75%  360.00ms
     90%  400.00ms
     99%    1.02s
  21600 requests in 15.01s, 4.50MB read
Requests/sec:   1439.04
Transfer/sec:    307.00KB
"""

TROUBLED = """\
Running 15s test @ http://127.0.0.1:8000/users/
  2 threads and 10000 connections
  Latency Distribution
     50%  850.00us
     75%    1.20ms
     90%    2.00ms
     99%    1.05m
  3000 requests in 1.00m, 1.00MB read
  Socket errors: connect 12, read 3, write 0, timeout 45
  Non-2xx or 3xx responses: 600
Requests/sec:     50.00
Transfer/sec:     17.00KB
"""

PGBENCH = """\
transaction type: /tmp/select.sql
scaling factor: 1
query mode: simple
number of clients: 20
number of threads: 2
maximum number of tries: 1
duration: 15 s
number of transactions actually processed: 255000
number of failed transactions: 0 (0.000%)
latency average = 1.176 ms
initial connection time = 25.000 ms
tps = 17000.123456 (without initial connection time)
"""


def test_wrk_report_without_errors_has_zero_errors():
    result = wrk.parse(CLEAN)
    assert result.requests == 21600
    assert result.duration_s == pytest.approx(15.01)
    assert result.rps == pytest.approx(1439.04)
    assert result.p50_ms == pytest.approx(340.0)
    assert result.p99_ms == pytest.approx(1020.0)
    assert (result.socket_errors, result.non_2xx) == (0, 0)
    assert result.ok_rps == pytest.approx(1439.04)


def test_wrk_units_errors_and_non_2xx_are_read():
    result = wrk.parse(TROUBLED)
    assert result.p50_ms == pytest.approx(0.85)
    assert result.p99_ms == pytest.approx(63_000)
    assert result.duration_s == pytest.approx(60)
    assert (result.connect_errors, result.read_errors, result.timeouts) == (12, 3, 45)
    assert result.socket_errors == 60
    assert result.non_2xx == 600
    assert result.ok_rps == pytest.approx(50 * 2400 / 3000)


def test_anything_but_a_wrk_report_is_refused():
    with pytest.raises(wrk.WrkError):
        wrk.parse("unable to connect to 127.0.0.1:8000 Connection refused")


def test_pgbench_report_and_logged_latencies_are_read():
    result = pgbench.parse(PGBENCH, clients=20, latencies_ms=[float(i) for i in range(1, 101)])
    assert (result.transactions, result.failed, result.clients) == (255000, 0, 20)
    assert result.tps == pytest.approx(17000.123456)
    assert result.p50_ms == pytest.approx(50.5)
    assert result.p99_ms == pytest.approx(99.01)


def _cell(variant: str, level: int, ok_rps: float, **changes) -> Cell:
    fields = dict(
        variant=variant,
        concurrency=level,
        rps=ok_rps,
        ok_rps=ok_rps,
        p50_ms=1.0,
        p99_ms=2.0,
        connect_errors=0,
        read_errors=0,
        write_errors=0,
        timeouts=0,
        non_2xx=0,
        peak_connections=20,
        rss_mb=100.0,
        anon_mb=10.0,
        requests=1000,
        cpu=CpuUse(1.0, 0.5, 0.2, 0.1, 0.0),
        listen_overflows=0,
    )
    return Cell(**{**fields, **changes})


def _run(*cells: Cell, rounds: int = 1) -> Run:
    return Run(
        command="",
        date="",
        machine={},
        settings={},
        variants={},
        cells=list(cells),
        planned_rounds=rounds,
    )


def test_a_ratio_goal_must_hold_at_every_level():
    run = _run(
        _cell("service", 50, 1000),
        _cell("peer-gthread", 50, 500),
        _cell("service", 500, 1000),
        _cell("peer-gthread", 500, 800),
    )
    peer_goal = next(g for g in goals.legacy_goals(run) if "peer-gthread" in g.name)
    assert peer_goal.met is False
    assert "2.00x at 50" in peer_goal.detail and "1.25x at 500" in peer_goal.detail


def test_c10k_p99_is_judged_against_littles_law():
    fair = _cell("service", 10_000, 2000, p99_ms=12_000)  # mean wait 5 s, bound 12.5 s
    unfair = _cell("service", 10_000, 2000, p99_ms=13_000)
    assert goals.little_wait_ms(fair) == pytest.approx(5000)
    assert goals.legacy_goals(_run(fair))[-1].met is True
    assert goals.legacy_goals(_run(unfair))[-1].met is False


def test_a_variant_that_served_nothing_gives_an_infinite_ratio():
    run = _run(_cell("service", 50, 1000), _cell("per-request", 50, 0, non_2xx=1000))
    goal = next(g for g in goals.legacy_goals(run) if "per-request" in g.name)
    assert goal.met is True and "served none" in goal.detail
    assert math.isinf(goals._ratio(1000, 0))


def test_cells_with_any_error_do_not_count_as_served():
    assert _cell("service", 50, 1000).clean
    assert not _cell("service", 50, 1000, timeouts=1).clean
    assert not _cell("service", 50, 1000, non_2xx=1).clean
    troubled = Cell.from_wrk("x", 50, wrk.parse(TROUBLED), Peak(), CpuUse(1, 0, 0, 0, 0), 0)
    assert troubled.non_2xx == 600 and not troubled.clean


def test_a_saved_run_renders_the_same_after_loading(tmp_path):
    run = _run(
        _cell("service", 50, 1000),
        _cell("per-request", 50, 0, requests=0, p50_ms=math.nan, p99_ms=math.nan),
    )
    run.save(tmp_path / "results.json")
    again = Run.load(tmp_path / "results.json")
    assert report.markdown(again, "results.png") == report.markdown(run, "results.png")


def test_a_level_where_clients_got_no_answer_is_not_served():
    starved = _cell("per-request", 10_000, 13, requests=195)
    assert starved.clean and not report.counts_as_served(starved)
    assert report.counts_as_served(_cell("per-request", 500, 167, requests=500))
    assert not report.counts_as_served(_cell("per-request", 500, 167, requests=499))
    assert not report.counts_as_served(_cell("per-request", 500, 167, requests=9_000, non_2xx=1))
    table = report.before_after(_run(_cell("per-request", 500, 167, requests=2505), starved))
    assert "500 (p99" in table and "unanswered at 10,000" in table


def test_rounds_are_judged_by_the_median_round():
    run = _run(
        *(_cell("service", 50, r, round=n, p99_ms=n) for n, r in ((1, 900), (2, 3000), (3, 1500))),
        *(_cell("peer-gthread", 50, r, round=n) for n, r in ((1, 1000), (2, 1100), (3, 500))),
        rounds=3,
    )
    median = run.cell("service", 50)
    assert (median.ok_rps, median.p99_ms) == (1500, 3)  # one round's figures, not a mix
    peer_goal = next(g for g in goals.legacy_goals(run) if "peer-gthread" in g.name)
    assert peer_goal.met is True  # 1,500 / 1,000, though round 1 alone gives 0.90
    assert "1.50x at 50 (rounds: 0.90, 2.73, 3.00)" in peer_goal.detail
    text = report.markdown(run, "results.png")
    assert "| 50 | 1,500 | 3.0 | 1,000 | 2.0 | 1.50x (peer-gthread) |" in text
    assert "| service | 50 | 3 (median) | 1,500 | 1,500 |" in text


def test_of_an_even_number_of_rounds_left_by_a_failure_the_slower_middle_one_is_the_median():
    run = _run(*(_cell("service", 50, rps, round=n) for n, rps in enumerate((4, 1, 3, 2), 1)))
    assert run.cell("service", 50).ok_rps == 2


def test_at_c10k_errors_count_in_every_round():
    clean = _cell("service", 10_000, 2000, round=1)
    errors = _cell("service", 10_000, 1000, round=2, read_errors=2, non_2xx=1)  # slowest round
    fast = _cell("service", 10_000, 2500, round=3)
    run = _run(clean, errors, fast, rounds=3)
    assert run.cell("service", 10_000) is clean  # the median round is clean...
    socket, non_2xx, _ = goals.legacy_goals(run)[-3:]
    assert socket.met is False and socket.detail.startswith("2 over 3 rounds")  # ...yet
    assert non_2xx.met is False and non_2xx.detail.startswith("1 over 3 rounds")
    assert all(g.met for g in goals.legacy_goals(_run(clean, fast, fast, rounds=3))[-3:])


def test_at_c10k_the_p99_bound_holds_in_every_round():
    fair = _cell("service", 10_000, 2000, round=1, p99_ms=6_000)  # Little's wait 5 s
    unfair = _cell("service", 10_000, 2000, round=2, p99_ms=13_000)  # over 12.5 s
    fast = _cell("service", 10_000, 4000, round=3, p99_ms=6_000)  # wait 2.5 s: ratio 2.4
    goal = goals.legacy_goals(_run(fair, unfair, fast, rounds=3))[-1]
    assert goal.met is False and "round 2" in goal.detail
    fast_worst = goals.legacy_goals(_run(fair, fast, fair, rounds=3))[-1]
    assert fast_worst.met is True and "ratio 2.40" in fast_worst.detail  # not the highest p99


def test_at_c10k_a_round_that_answered_nothing_fails():
    fair = _cell("service", 10_000, 2000, p99_ms=6_000)
    for silent in (
        _cell("service", 10_000, 0, round=2, requests=0, p99_ms=math.nan),
        _cell("service", 10_000, 0, round=2, requests=0, p99_ms=0.0),
    ):
        for cells in ((fair, silent), (silent, fair)):
            goal = goals.legacy_goals(_run(*cells, rounds=2))[-1]
            assert goal.met is False and "answered nothing" in goal.detail


def test_rounds_lost_to_a_failure_count_as_missed():
    run = _run(
        _cell("service", 50, 3000, round=1),
        _cell("peer-gthread", 50, 1000, round=1),
        _cell("service", 10_000, 3000, round=1),  # then the server failed
        _cell("peer-gthread", 10_000, 1000, round=1),
        rounds=3,
    )
    peer_goal = next(g for g in goals.legacy_goals(run) if "peer-gthread" in g.name)
    assert peer_goal.met is False and "service: 1 of 3 rounds" in peer_goal.detail
    assert not any(g.met for g in goals.legacy_goals(run)[-3:])
    run.failures.append("service at 10,000, round 2: the server exited")
    assert "- service at 10,000, round 2: the server exited" in report.markdown(run, "x.png")


def test_a_variant_missing_at_a_level_misses_the_goal_there():
    run = _run(
        _cell("service", 50, 3000), _cell("peer-gthread", 50, 1000), _cell("service", 500, 3000)
    )
    peer_goal = next(g for g in goals.legacy_goals(run) if "peer-gthread" in g.name)
    assert peer_goal.met is False and "peer-gthread: 0 of 1 rounds" in peer_goal.detail


def test_the_service_serving_nothing_never_meets_a_ratio():
    run = _run(_cell("service", 50, 0, non_2xx=9), _cell("per-request", 50, 0, non_2xx=9))
    goal = next(g for g in goals.legacy_goals(run) if "per-request" in g.name)
    assert goal.met is False


def test_a_level_is_served_only_if_every_round_served_it():
    served = _cell("per-request", 500, 167, requests=2505, round=1)
    unanswered = _cell("per-request", 500, 167, requests=400, round=2)
    assert "500 (p99" in report.before_after(_run(served))
    table = report.before_after(_run(served, unanswered))
    assert "none of the levels tried" in table


def test_each_round_starts_one_variant_and_one_workload_further_along_then_pgbench_once():
    order = run_module.turns(["service", "ceiling", "asyncio", "database"], ["mix", "get"], 3)
    mg, gm, hz = ("mix", "get"), ("get", "mix"), ("healthz",)
    assert order == [
        (1, "service", mg), (1, "ceiling", hz), (1, "asyncio", mg),
        (2, "ceiling", hz), (2, "asyncio", gm), (2, "service", gm),
        (3, "asyncio", mg), (3, "service", mg), (3, "ceiling", hz),
        (1, "database", ("get",)),
    ]  # fmt: skip
    assert run_module.turns(["database"], ["mix"], 3) == [(1, "database", ("get",))]


@pytest.mark.parametrize("rounds", ["0", "2", "x", "-1"])
def test_only_an_odd_number_of_rounds_is_taken(rounds):
    with pytest.raises(SystemExit):
        run_module._parse(["--rounds", rounds])
    assert run_module._parse(["--rounds", "5"]).rounds == 5


def test_a_run_saved_before_rounds_loads_as_one_round(tmp_path):
    path = tmp_path / "results.json"
    _run(_cell("service", 50, 1000)).save(path)
    saved = json.loads(path.read_text())
    del saved["cells"][0]["round"]  # what a run saved before rounds existed holds
    path.write_text(json.dumps(saved))
    again = Run.load(path)
    assert [c.round for c in again.cells] == [1]
    assert "One round per stack, workload and level." in report.markdown(again, "results.png")


# ---------------------------------------------------------------- issue 18: stacks x workloads


def _stacks(workload: str, level: int, service: float, gthread: float, gevent: float, aio: float):
    """One round of the four stacks with one workload at one level."""
    rates = {"service": service, "peer-gthread": gthread, "peer-gevent": gevent, "asyncio": aio}
    return [_cell(name, level, rps, workload=workload) for name, rps in rates.items()]


def _goal(run: Run, name_start: str, level: int) -> goals.Goal:
    return next(g for g in goals.goals(run) if g.name.startswith(name_start) and g.level == level)


def test_the_mix_is_judged_against_the_best_flask_peer_and_asyncio_at_each_level():
    run = _run(
        *_stacks("mix", 50, 3000, 1500, 1800, 3200),  # 1.67x the best peer, 0.94x asyncio
        *_stacks("mix", 500, 3000, 2100, 1900, 3500),  # 1.43x the best peer, 0.86x asyncio
    )
    peer_50, peer_500 = _goal(run, "mix: service ≥ 1.5", 50), _goal(run, "mix: service ≥ 1.5", 500)
    assert peer_50.met is True and "1.67x: service 3,000 vs peer-gevent 1,800" in peer_50.detail
    assert peer_500.met is False and "vs peer-gthread 2,100" in peer_500.detail  # the faster one
    assert "short by 0.07x: the service needs 5% more ok req/s" in peer_500.detail
    assert _goal(run, "mix: service ≥ 0.9 x asyncio", 50).met is True
    missed = _goal(run, "mix: service ≥ 0.9 x asyncio", 500)
    assert missed.met is False and "0.86x" in missed.detail and "5% more" in missed.detail


def test_every_route_alone_must_reach_1_2_times_the_best_flask_peer():
    run = _run(
        *_stacks("get", 50, 2400, 2000, 1000, 2500),
        *_stacks("create", 50, 2300, 2000, 1000, 2500),
    )
    assert _goal(run, "get: service ≥ 1.2", 50).met is True
    create = _goal(run, "create: service ≥ 1.2", 50)
    assert create.met is False and "1.15x" in create.detail
    by_name = {g.name: g for g in goals.goals(run) if g.level is None}
    for route in ("list", "update"):  # not run: neither met nor missed
        assert by_name[f"{route}: service ≥ 1.2 x best Flask peer (ok req/s)"].met is None
    assert by_name["mix: service ≥ 1.5 x best Flask peer (ok req/s)"].met is None


def test_a_goal_names_the_flask_peer_the_run_left_out():
    run = _run(
        _cell("service", 50, 3000, workload="mix"), _cell("peer-gevent", 50, 1000, workload="mix")
    )
    goal = _goal(run, "mix: service ≥ 1.5", 50)
    assert goal.met is True and "(peer-gthread not in this run)" in goal.detail
    assert next(g for g in goals.goals(run) if "asyncio" in g.name).met is None


def test_a_stack_missing_rounds_at_a_level_misses_that_level():
    run = _run(
        *(_cell("service", 50, 3000, round=n, workload="list") for n in (1, 2, 3)),
        *(_cell("peer-gthread", 50, 1000, round=n, workload="list") for n in (1, 2)),  # failed
        rounds=3,
    )
    goal = _goal(run, "list: service ≥ 1.2", 50)
    assert goal.met is False and "peer-gthread: 2 of 3 rounds" in goal.detail


def test_the_goals_table_has_a_row_per_goal_and_level():
    run = _run(*_stacks("mix", 50, 3000, 1500, 1800, 3200), *_stacks("mix", 500, 10, 9, 8, 7))
    table = report.goals_table(run)
    assert "| mix: service ≥ 1.5 x best Flask peer (ok req/s) | 50 | met |" in table
    assert "| mix: service ≥ 1.5 x best Flask peer (ok req/s) | 500 | **missed** |" in table
    assert "| update: service ≥ 1.2 x best Flask peer (ok req/s) |  | not measured |" in table


def test_each_workload_gets_a_table_of_levels_with_the_services_ratios():
    run = _run(*_stacks("update", 50, 3000, 1500, 2000, 2500))
    text = report.markdown(run, "results.png")
    assert "| connections | service req/s | service p99 ms | peer-gthread req/s |" in text
    row = "| 50 | 3,000 | 2.0 | 1,500 | 2.0 | 2,000 | 2.0 | 2,500 | 2.0 |"
    assert row + " 1.50x (peer-gevent) | 1.20x |" in text
    assert "| 50 | 0.50 / 0.20 | 0.50 / 0.20 | 0.50 / 0.20 | 0.50 / 0.20 |" in text  # CPU ms/req
    assert "No socket error and no answer of 400 or above in any round." in text
    run.cells.append(_cell("asyncio", 500, 900, workload="update", non_2xx=3, read_errors=2))
    assert "asyncio at 500 round 1: non-2xx 3, socket errors 0/2/0/0" in report.markdown(run, "x")


def test_write_workloads_get_a_fresh_tag_every_wrk_run():
    create, mix = WORKLOADS["create"], WORKLOADS["mix"]
    first, second = create.lua_args(10_000), create.lua_args(10_000)
    assert len(first) == 1 and first != second
    assert mix.lua_args(10_000)[0] == "10000" and len(mix.lua_args(10_000)) == 2
    assert WORKLOADS["get"].lua_args(500) == ["500"] and WORKLOADS["list"].lua_args(500) == []
    for name in ("mix", "get", "list", "create", "update"):
        assert WORKLOADS[name].script.exists()


def test_workloads_and_stacks_are_chosen_on_the_command_line():
    args = run_module._parse(["--workloads", "create,mix", "--stacks", "peer-gevent,service"])
    assert args.workloads == ["create", "mix"]  # as given: the first round's order
    assert args.stacks == ["service", "peer-gevent"]  # the report's order
    defaults = run_module._parse([])
    assert defaults.workloads == ["mix", "get", "list", "create", "update"]
    assert defaults.levels == [50, 500, 5000]
    for bad in (["--workloads", "healthz"], ["--stacks", "pooled"], ["--workloads", ","]):
        with pytest.raises(SystemExit):
            run_module._parse(bad)


def test_a_run_saved_before_issue_18_loads_with_the_new_names(tmp_path):
    path = tmp_path / "results.json"
    _run(_cell("service", 50, 1000), _cell("ceiling", 50, 2000, workload="healthz")).save(path)
    saved = json.loads(path.read_text())
    saved["cells"][0]["variant"] = "pooled"
    for cell in saved["cells"]:
        del cell["workload"]  # what a run saved before issue 18 holds
    del saved["workloads"]
    saved["variants"] = {"pooled": "the service", "peer": "the gthread peer"}
    path.write_text(json.dumps(saved))
    again = Run.load(path)
    assert [(c.variant, c.workload) for c in again.cells] == [
        ("service", "get"),
        ("ceiling", "healthz"),
    ]
    assert list(again.variants) == ["service", "peer-gthread"]
    assert "0.50x at 50" in goals.legacy_goals(again)[2].detail  # service / ceiling


def test_a_saved_run_of_every_workload_renders_the_same_after_loading(tmp_path):
    run = _run(*_stacks("mix", 50, 3000, 1500, 1800, 3200), *_stacks("list", 50, 1, 2, 3, 4))
    run.workloads = {"mix": "the mix", "list": "the list"}
    run.save(tmp_path / "results.json")
    again = Run.load(tmp_path / "results.json")
    assert report.markdown(again, "results.png") == report.markdown(run, "results.png")


def test_a_comparison_gives_server_cpu_per_request_beside_req_s_and_their_median_ratios():
    def answered(rps: float, p99_ms: float) -> wrk.WrkResult:
        return wrk.WrkResult(int(rps * 10), duration_s=10, rps=rps, p50_ms=1, p99_ms=p99_ms)

    rounds = [
        compare.Round(
            number,
            ("A", "B"),
            results={"A": answered(1000, 10), "B": answered(1100, 9)},
            cpu_ms={"A": a_cpu, "B": b_cpu},
        )
        for number, (a_cpu, b_cpu) in enumerate([(0.8, 0.6), (0.7, 0.7), (0.9, 0.6)], 1)
    ]
    table = compare._table(50, rounds)

    first = "| 1 | A, B | 1,000 | 10.0 | 1,100 | 9.0 | 1.100 | 0.900 | 0.800 | 0.600 | 0.750 |"
    assert first in table.splitlines()
    # CPU per request: medians 0.8 and 0.6; the per-round ratios 0.75, 1.0 and 0.667.
    [median] = [line for line in table.splitlines() if line.startswith("| **median**")]
    assert median.endswith("| 1.100 | 0.900 | 0.800 | 0.600 | 0.750 |")


def test_a_second_sigterm_does_not_cut_short_the_stopping_the_first_began(tmp_path):
    """The first SIGTERM unwinds into `finally`; one more while that runs (a `timeout`
    forwarding its own after a `pkill`) must not leave PostgreSQL or a server running."""
    go, stopped = tmp_path / "go", tmp_path / "stopped"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, sys, time\n"
            "from bench.servers import stop_everything_on_sigterm\n"
            "stop_everything_on_sigterm()\n"
            "try:\n"
            "    print('running', flush=True)\n"
            "    time.sleep(60)\n"
            "finally:\n"
            "    print('stopping', flush=True)\n"
            "    deadline = time.monotonic() + 20\n"
            f"    while not pathlib.Path({str(go)!r}).exists() and time.monotonic() < deadline:\n"
            "        time.sleep(0.01)\n"
            f"    pathlib.Path({str(stopped)!r}).write_text('all of it')\n",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "running\n"
        child.send_signal(signal.SIGTERM)
        assert child.stdout.readline() == "stopping\n"
        child.send_signal(signal.SIGTERM)
        go.touch()
        assert child.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        child.kill()
        child.wait()
    assert stopped.read_text() == "all of it"


def test_a_read_that_joined_a_batch_is_attributed_by_the_token_it_got(tmp_path):
    """Only a batch's sender has `db_server` in its access line; the reads that joined it got
    the same token, and are put on the same kind of server, unless that token was seen on
    both kinds."""
    log = tmp_path / "a.log"
    lines = [
        {"logger": "service.access", "request_id": "p-1", "db_server": "127.0.0.1:5433"},
        {"logger": "service.access", "request_id": "p-2"},
        {"logger": "service.access", "request_id": "p-3", "db_server": "primary"},
        {"logger": "service.access", "request_id": "p-4"},
        {"logger": "service.access", "request_id": "p-5", "db_server": "127.0.0.1:5434"},
        {"logger": "service.access", "request_id": "p-6"},
        {"logger": "service.error", "request_id": "p-7", "message": "not an access line"},
        {"logger": "service.access", "request_id": "q-1", "db_server": "primary"},
    ]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    found = clients.access_lines([log], "p-")
    assert sorted(found) == ["p-1", "p-2", "p-3", "p-4", "p-5", "p-6"]
    tokens = {"p-1": 10, "p-2": 10, "p-3": 20, "p-4": 20, "p-5": 30, "p-6": 30, "p-7": 40}
    reads = [clients.Sent(rid, "get", 0, 0.0, token_got=t) for rid, t in tokens.items()]
    reads.append(clients.Sent("p-8", "get", 0, 0.0, token_got=20))
    reads[2].token_got = reads[4].token_got = 30  # p-3 (primary) and p-5 (a replica) share one
    servers = clients.servers_of(reads, found)
    assert servers == {
        "p-1": "replica",
        "p-2": "replica",
        "p-3": "primary",
        "p-4": None,  # its token, 20, was named on no line
        "p-5": "replica",
        "p-6": None,  # its token, 30, was seen on the primary and on a replica
        "p-7": None,
        "p-8": None,
    }


def test_the_otlp_sink_answers_exports_and_counts_their_spans(tmp_path):
    """bench/otlp_sink.py, as `bench.compare --b-traced` starts it: an export of three spans is
    answered 200 with an ExportTraceServiceResponse, another path 404, and SIGTERM writes the
    counts."""
    import http.client

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    sink = compare._Sink(tmp_path)
    try:
        export = ExportTraceServiceRequest(
            resource_spans=[
                ResourceSpans(scope_spans=[ScopeSpans(spans=[Span(name="a"), Span(name="b")])]),
                ResourceSpans(scope_spans=[ScopeSpans(spans=[Span(name="c")])]),
            ]
        ).SerializeToString()
        conn = http.client.HTTPConnection("127.0.0.1", sink.port, timeout=10)
        conn.request("POST", "/v1/traces", export, {"Content-Type": "application/x-protobuf"})
        reply = conn.getresponse()
        assert reply.status == 200
        ExportTraceServiceResponse.FromString(reply.read())
        conn.request("POST", "/elsewhere", b"", {"Content-Length": "0"})
        reply = conn.getresponse()
        assert reply.status == 404
        reply.read()
        conn.close()
    finally:
        counts = sink.stop()
    assert counts == {"exports": 1, "spans": 3, "bytes": len(export)}


# Samples as py-spy writes them (--format raw), root first.
_WORKER = (
    "_handle_and_close_when_done (gevent/baseserver.py:34);"
    "AsyncWorker.handle_request (gunicorn/workers/base_async.py:329);"
    "Flask.wsgi_app (flask/app.py:1511)"
)


def _no_source(path: str, line: int) -> str:
    return ""


def test_a_sample_counts_in_its_innermost_known_part_past_the_standard_library():
    request_id = f"{_WORKER};_begin (service/observability/logs.py:92);uuid4 (uuid.py:723)"
    assert profile.part(request_id, _no_source) == "logging (access line, request id)"
    matched = (
        f"{_WORKER};MapAdapter.match (werkzeug/routing/map.py:605);compile (re/__init__.py:227)"
    )
    assert profile.part(matched, _no_source) == "routing"
    assert profile.part(_WORKER, _no_source) == "Flask, werkzeug or Starlette request + response"
    hub = "run (gevent/hub.py:647);_run_callbacks (gevent/_abstract_linkable.py:10)"
    assert profile.part(hub, _no_source) == profile.EVENT_LOOP


def test_a_call_into_c_counts_as_the_work_it_names():
    sent = (
        f"{_WORKER};write (gunicorn/util.py:348);"
        "ClientSocket._send (service/server/connections.py:342);sendall (gevent/_socket3.py:410)"
    )
    assert profile.part(sent, _no_source) == "socket send/recv"
    statement = f"{_WORKER};_users_by_id (service/api/users.py:215)"
    assert profile.part(statement, lambda p, n: "        db.execute(sql, (uid,))") == "driver"
    assert profile.part(statement, lambda p, n: "        rows = {}") == (
        "app code (views, hooks, validation)"
    )
    written = "RequestResponseCycle.send (uvicorn/protocols/http/httptools_impl.py:522)"
    assert profile.part(written, lambda p, n: "self.transport.write(data)") == "socket send/recv"
    assert profile.part(written, _no_source) == "HTTP parsing"


def test_shares_add_up_the_samples_of_each_part():
    raw = f"{_WORKER} 3\n{_WORKER};_begin (service/observability/logs.py:92) 1\n"
    found, samples = profile.shares(raw, _no_source)
    assert samples == 4
    assert found == {
        "Flask, werkzeug or Starlette request + response": 0.75,
        "logging (access line, request id)": 0.25,
    }


def test_batch_sizes_come_from_the_counters_of_two_metrics_pages():
    page = (
        "# HELP db_lookups_total Single rows looked up by key\n"
        "db_lookups_total 100.0\ndb_lookup_queries_total 10.0\n"
        'db_batched_writes_total{kind="create"} 30.0\n'
        'db_batch_statements_total{kind="create"} 20.0\n'
    )
    before = profile.parse_counters(page)
    after = dict(before, db_lookups_total=190.0, db_lookup_queries_total=20.0)
    after['db_batched_writes_total{kind="create"}'] = 45.0
    after['db_batch_statements_total{kind="create"}'] = 30.0
    assert profile.batch_sizes(before, after) == {
        "reads by id per query": 9.0,
        "creates per statement": 1.5,
    }
