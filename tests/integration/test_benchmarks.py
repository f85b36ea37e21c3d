"""The benchmark commands run, and the in-process one checks exactness on its way."""

import json

from specedge_bench import modes as bench_modes
from specedge_bench import verify as bench_verify


def test_bench_modes_runs_and_finds_identical_outputs(capsys):
    assert bench_modes.main(["--num-prompts", "2", "--max-tokens", "12", "--budget", "8", "--depth", "2"]) == 0
    table = capsys.readouterr().out
    assert "outputs identical across modes: True" in table
    assert all(f"| {mode} |" in table for mode in ("autoregressive", "server-only", "specedge"))


def test_bench_verify_writes_its_grid(tmp_path, capsys):
    out = tmp_path / "grid.json"
    assert bench_verify.main(["--batch", "1,2", "--nodes", "1,4", "--context", "16", "--repeats", "1",
                              "--backends", "flex", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["batch"], r["nodes"]) for r in rows} == {(1, 1), (1, 4), (2, 1), (2, 4)}
    assert all(r["step_ms_median"] > 0 and r["host_transfers_per_pass"] == 1 for r in rows)


def test_bench_plane_runs_over_real_services(capsys):
    from specedge_bench import plane as bench_plane

    assert bench_plane.main(["--num-prompts", "1", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "message-plane overhead per cycle" in out and "| in process, `specedge` mode |" in out


async def test_the_benchmarks_wan_link_delays_each_way(nats_url):
    """`specedge_bench.wan`: what a wrapped client publishes, and what reaches its
    subscriptions, arrives half the round trip late; a reply to it takes the whole trip."""
    import asyncio
    import time

    import nats

    from specedge_bench.wan import DelayedClient

    plain, raw = await nats.connect(nats_url), await nats.connect(nats_url)
    edge = DelayedClient(raw, one_way_s=0.1)
    arrived: asyncio.Queue = asyncio.Queue()

    async def echo(msg) -> None:
        await plain.publish("wan.back", msg.data)

    async def back(msg) -> None:
        await arrived.put(time.monotonic())

    await plain.subscribe("wan.out", cb=echo)
    await edge.subscribe("wan.back", cb=back)
    await raw.flush()
    start = time.monotonic()
    await edge.publish("wan.out", b"x")
    assert 0.2 <= await asyncio.wait_for(arrived.get(), 5) - start < 0.6
    await plain.close()
    await raw.close()
