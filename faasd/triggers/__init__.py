"""Event sources: each turns something outside into invocations through the invoker."""
