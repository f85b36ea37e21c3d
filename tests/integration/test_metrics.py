"""Prometheus metrics of the gateway, scheduler and verifier, scraped after real requests:
vLLM's names under `specedge:`, and the counters add up across services."""

import signal

import httpx

from specedge.launcher import free_port
from tests.helpers import scrape, start_cli, wait_for, wait_until_serving


def test_metrics_add_up_across_gateway_scheduler_and_verifier(nats_url, redis_url, cli_env, tmp_path):
    ports = {"verifier": free_port(), "scheduler": free_port(), "gateway": free_port()}
    procs = {
        "verifier": start_cli(["verifier", "--nats-url", nats_url, "--redis-url", redis_url, "--max-len", "1024",
                               "--metrics-port", str(ports["verifier"])], cli_env, tmp_path / "verifier.log"),
        "scheduler": start_cli(["scheduler", "--nats-url", nats_url, "--redis-url", redis_url, "--budget", "16",
                                "--depth", "3", "--metrics-port", str(ports["scheduler"])], cli_env,
                               tmp_path / "scheduler.log"),
        "edge-agent": start_cli(["edge-agent", "--nats-url", nats_url, "--max-len", "1024"], cli_env,
                                tmp_path / "edge.log"),
        "gateway": start_cli(["gateway", "--nats-url", nats_url, "--redis-url", redis_url, "--no-api-key",
                              "--max-context", "1024", "--port", str(ports["gateway"])], cli_env,
                             tmp_path / "gateway.log"),
    }
    try:
        gateway = f"http://127.0.0.1:{ports['gateway']}"
        wait_until_serving(nats_url, procs, gateway)
        returned = prompt = 0
        speculation = {"verifications": 0, "draft_tokens": 0, "accepted_tokens": 0}
        for i in range(3):
            reply = httpx.post(f"{gateway}/v1/chat/completions", timeout=120, json={
                "model": "specedge-tiny-target", "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": f"Write a function that checks case {i}."}]}).json()
            returned += reply["usage"]["completion_tokens"]
            prompt += reply["usage"]["prompt_tokens"]
            for key in speculation:  # the reply's own speculative stats (extension field)
                speculation[key] += reply["specedge"][key]
        gw = scrape(f"{gateway}/metrics")
        assert gw["specedge:generation_tokens_total"] == returned
        assert gw["specedge:prompt_tokens_total"] == prompt
        assert gw["specedge:time_to_first_token_seconds_count"] == 3
        assert gw["specedge:e2e_request_latency_seconds_count"] == 3
        assert gw["specedge:inter_token_latency_seconds_count"] > 0
        assert gw["specedge:num_requests_running"] == 0

        sched = wait_for(lambda: (s := scrape(f"http://127.0.0.1:{ports['scheduler']}/metrics"))
                         and s["specedge:num_requests_running"] == 0 and s, 10, "the scheduler to settle")
        ver = scrape(f"http://127.0.0.1:{ports['verifier']}/metrics")
        drafts, draft_tokens = sched["specedge:spec_decode_num_drafts_total"], sched[
            "specedge:spec_decode_num_draft_tokens_total"]
        accepted = sched["specedge:spec_decode_num_accepted_tokens_total"]
        assert 0 < accepted <= draft_tokens
        assert drafts == sched["specedge:verify_batch_size_sum"]  # one draft per tree verified
        assert sched["specedge:verify_batch_size_count"] == ver["specedge:verifier_forward_passes_total"]
        per_pos = sum(v for k, v in sched.items()
                      if k.startswith("specedge:spec_decode_num_accepted_tokens_per_pos_total"))
        assert per_pos == accepted
        assert drafts + accepted >= returned  # every cycle commits its accepted tokens and a bonus
        # what the replies said about their speculation is what the scheduler counted
        assert speculation == {"verifications": drafts, "draft_tokens": draft_tokens, "accepted_tokens": accepted}
        assert ver["specedge:verifier_busy_seconds_total"] > 0 and 0 < ver["specedge:verifier_busy_fraction"] <= 1
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
    for log in tmp_path.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()
