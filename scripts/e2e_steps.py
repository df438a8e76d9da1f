"""The step counter tern's end-to-end scripts share (e2e_deploy.py, agent_e2e.py): one
`ok`/`FAIL` line per checked step, then one closing line scripts/test adds up."""
import sys

_counts = {"passed": 0, "failed": 0}


def check(what, cond, detail=""):
    """Counts and prints one step."""
    if cond:
        _counts["passed"] += 1
        print(f"  ok  {what}")
    else:
        _counts["failed"] += 1
        print(f"  FAIL {what} {detail}")


def finish(name):
    """Prints `NAME: N steps passed, M failed` and exits 1 if any step failed."""
    print(f"{name}: {_counts['passed']} steps passed, {_counts['failed']} failed")
    sys.exit(1 if _counts["failed"] else 0)
