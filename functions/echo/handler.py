"""Returns the event it got and what Lambda's context says, for poking at faasd."""

import os


def handler(event, context):
    return {
        "event": event,
        "context": {
            "function_name": context.function_name,
            "aws_request_id": context.aws_request_id,
            "memory_limit_in_mb": context.memory_limit_in_mb,
            "remaining_ms": context.get_remaining_time_in_millis(),
        },
        "tmpdir": os.environ.get("TMPDIR"),
    }
