"""The daemon's stdout: every line of an invocation carries its request id, in text and in JSON."""

from __future__ import annotations

import json

import pytest

from support import loaded, wait_until, write_function

CHATTY = """
import logging, sys

def handler(event, context):
    print("first line")
    print("second line", file=sys.stderr)
    logging.getLogger().warning("through logging")
    return "ok"
"""


def invoke_chatty(daemon) -> str:
    write_function(daemon.functions, "chatty.py", CHATTY)
    loaded(daemon, "chatty")
    response = daemon.invoke("chatty", {})
    assert response.status == 200, response.text
    request_id = response.headers["x-amzn-requestid"]
    wait_until(lambda: f"REPORT RequestId: {request_id}" in daemon.output(), message="the REPORT line")
    return request_id


def test_text_lines_of_an_invocation_all_carry_its_request_id(daemon):
    request_id = invoke_chatty(daemon)
    lines = [line for line in daemon.output().splitlines() if "[chatty]" in line]
    texts = [line.split(request_id, 1)[1].strip() if request_id in line else line for line in lines]
    assert any(t.startswith("START RequestId") for t in texts)
    assert "first line" in texts and "second line" in texts
    assert any("through logging" in t for t in texts)
    assert any(t.startswith("REPORT RequestId") for t in texts)
    assert all(request_id in line for line in lines), [l for l in lines if request_id not in l]


@pytest.mark.parametrize("how", ["flag", "config"])
def test_json_lines_are_one_object_each_with_function_and_request_id(start_daemon, functions_dir,
                                                                     tmp_path, how):
    if how == "flag":
        daemon = start_daemon(functions_dir, args=["--log-format", "json"])
    else:
        config = tmp_path / "faasd.toml"
        config.write_text('[log]\nformat = "json"\n')
        daemon = start_daemon(functions_dir, config=config)
    request_id = invoke_chatty(daemon)
    entries = [json.loads(line) for line in daemon.output().splitlines() if line.strip()]
    assert all({"time", "level", "message"} <= set(entry) for entry in entries)
    ours = [entry for entry in entries if entry.get("function") == "chatty"]
    messages = [entry["message"] for entry in ours]
    assert "first line" in messages and "second line" in messages
    assert any(m.startswith("REPORT RequestId") for m in messages)
    assert all(entry["request_id"] == request_id for entry in ours)
    # The daemon's own lines are JSON too.
    assert any(entry.get("logger") == "faasd" and entry["message"].startswith("listening on")
               for entry in entries)
